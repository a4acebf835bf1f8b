"""spikealign: learning feedback weights without weight transport.

Modules
-------
feedback   learning rules as PyTorch layers (bp, fa, usf, brsf, frsf, dfa, wm, kp, learned)
metrics    alignment between forward weights and feedback
models     the paper's convolutional network
lif        the leaky integrate-and-fire network of the feedback-training phase (Brian2)
rdd        the regression discontinuity estimator of causal effects
phase      one feedback-training phase: simulate, estimate beta, update the feedback weights
spikelog   the HDF5 spike-log format (writer and reader)
outputs    output paths checked before work; one writer per output (lock files)
data       datasets (torchvision) and the offline ``digits`` set
trainer    the training loop alternating the spiking phase with forward learning
conservation  conserved quantities of feedback alignment, sign symmetry and backprop (METHOD 9)
fa_theory  batched sweeps and the experiments on feedback alignment's implicit regularisation
"""

__version__ = "0.1.0"
