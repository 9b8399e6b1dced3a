"""Every tuned constant of the execution paths, in one place, with the measurement behind it.

None of these decides which path runs a layer when the choice is measured (the default, see
:mod:`kernelwarehouse.core.choice`): there they only size the work inside a path, or prune
candidates that cannot win. The thresholds of the fixed rule (``KERNELWAREHOUSE_PATH_CHOICE=rule``,
:func:`kernelwarehouse.core.paths.rule_choice`) are here too; the rule is a documented,
deterministic fallback, not the fast choice. Modules read these at call time, so a test or a user
may set them (``kernelwarehouse.tuning.LOOP_SLICE_ELEMENTS = ...``).

Machines named below: "EPYC-512" is a 2-core AMD EPYC VM with AVX-512 (torch 2.14.1, 2 threads),
"Xeon-512" a 2-core Intel Xeon VM with AVX-512, "H100" an NVIDIA H100. ``benchmarks/layers.py``
measures the per-layer figures again on any machine.
"""

from __future__ import annotations

# -- sizes of the work inside a path -------------------------------------------------------------

#: Weight elements one step of the recomputing paths (``grouped``, ``unfold``) assembles at once:
#: B |W| floats for a ResNet's last stage at batch 32 would outweigh the activations kept for
#: backward. Larger steps were faster on an H100 but took peak training memory from 1.1x to 2.0x the
#: static model's.
CHUNK_ELEMENTS = 1 << 23

#: Weight elements the ``loop`` path builds and applies at once (EPYC-512): a 256x256x3x3 weight in
#: one piece, a 512x512x3x3 one in slices of 128 output channels, so that the slice, the
#: convolution's copy of it and the cells it reads share the cache.
LOOP_SLICE_ELEMENTS = 600_000

#: Output positions up to which the ``loop`` path's per-sample backward takes each weight gradient as
#: one native product over the sample's patches (EPYC-512: 7.6 ms against 33 ms for the convolution
#: library's per-sample weight gradient of a ResNet18 layer3 convolution).
PRODUCT_MAX_POSITIONS = 256

#: Output channels per block of the ``fused`` path's kernel (:mod:`kernelwarehouse.core.fused`): four
#: AVX-512 vectors, eight AVX2 ones; the warehouse is packed in blocks of this many channels. Xeon-512,
#: one thread, KW-ResNet18 1x layer4 3x3 conv at batch 16 (the kernel alone): 64 channels 65 ms, 32
#: 95 ms, 128 87 ms, 16 113 ms.
FUSED_CHANNELS = 64

#: Floats of warehouse cells and assembled weight tiles that one thread of the ``fused`` path keeps in
#: cache at once, (n + column blocks * 6) * columns * FUSED_CHANNELS (2 MiB: the L2 cache of one core
#: of the Xeon-512; the same layer: 2^17 to 2^20 floats all within 65-78 ms, 2^15 92 ms).
FUSED_TILE_FLOATS = 1 << 19

#: Cell channels per block of the ``fused`` path's weight-side backward, and the floats of
#: weight-gradient tiles (every sample and column block of a slice of columns) one thread keeps at
#: once. Xeon-512, one thread, the same layer: 16 channels and 2^21 floats 121 ms; 8 channels
#: 145 ms, 32 153 ms, 64 173 ms; 2^19 floats 143 ms, 2^17 164 ms.
FUSED_GRAD_CHANNELS = 16
FUSED_GRAD_TILE_FLOATS = 1 << 21

#: Native kernel calls below this many multiply-adds, or along rows shorter than one vector, cost
#: more than PyTorch's product (EPYC-512: 1.5-3x slower up to 1.5e5 multiply-adds, call and thread
#: start-up; 1.3x faster at 6e5, 2-3x from 4e6 on).
NATIVE_MIN_MACS = 1 << 18
NATIVE_MIN_LENGTH = 16  # one AVX-512 vector, two AVX2 ones

#: Tile edges and warps of the ``triton`` path's kernels (:mod:`kernelwarehouse.core.triton_conv`):
#: output (or input) positions per tile, channels per tile, and the reduction step over channels
#: (positions for the weight gradient); each is cut down to the power of two that covers a small
#: layer (16 at least, what a matrix product on tensor cores takes). Not timed on a GPU yet. Each
#: assembled weight tile serves one tile of positions, so larger position tiles assemble less often;
#: compiled for sm_90 (Triton 3.8's ptxas, 2026-11-30; ``pytest -m slow tests/test_triton.py``),
#: 128 x 64 x 32 spills registers on 4 warps (255 registers and 104-360 bytes of stack per thread in
#: the forward and input-gradient kernels, fp32 and bf16) and spills nothing on 8 warps (177-193).
TRITON_BLOCK_POSITIONS = 128
TRITON_BLOCK_CHANNELS = 64
TRITON_BLOCK_REDUCTION = 32
TRITON_WARPS = 8

# -- the measured choice ---------------------------------------------------------------------------

#: Timed runs per candidate path, after one untimed warm-up; the fastest run counts (the least
#: disturbed by other work on the machine).
MEASURE_REPEATS = 3

#: A candidate whose untimed warm-up run alone takes over this many times the best time so far is not
#: run again: it cannot win (a warm-up may pay one-time costs, so the bound is looser than the 2x that
#: stops the timed runs). A 2-process digits epoch of KW-ResNet18 1/2x at one thread per process
#: (Xeon-512 restricted to AVX2) spent about 6 of its 7 minutes timing candidates, most of it on
#: candidates 5-20 times slower than the best.
MEASURE_WARMUP_STOP = 4.0

#: Candidates pruned before timing, where they cannot win and would make the first step slow:
#: ``mix`` and the ``loop:mix`` backward where they cost more than this many times the multiply-adds
#: of assembling (n L |W| / (spatial blocks * input blocks) against (n + L) |W| per sample). Xeon-512,
#: KW-ResNet18 1x at batch 16: at 1.9x (layer4) ``mix`` was within 2 % of the best path, from 4.2x on
#: (layer3 and up) it lost by 3-25x, in training too.
MIX_PRUNE_ADVANTAGE = 3.0

#: ... and the ``loop:slices`` backward on maps of more than this many output positions (Xeon-512,
#: batch 16: 0.9-1.1x the per-sample backward at 196 positions, 1.2-2.2x slower at 784, 2-5x at 3136).
SLICES_PRUNE_POSITIONS = 1024

# -- the fixed rule ----------------------------------------------------------------------------------

#: ``mix`` where it spends at most this many times the multiply-adds of assembling (EPYC-512, H100).
MIX_ADVANTAGE = 2.5

#: The rule takes ``loop`` on CPU only with at least this many input channels per group (a depthwise
#: convolution of B samples is one depthwise convolution of B * C channels) ...
LOOP_MIN_INPUTS = 8
#: ... and at least this many multiply-adds per sample, (n + L) |W| (a call per sample costs tens of
#: microseconds).
LOOP_MIN_MACS = 1 << 23

#: The rule's ``loop`` backward goes by slices of output channels up to this many output positions
#: (EPYC-512: about half the time of the mix form in a ResNet18's last stage; on larger maps the
#: convolution library's per-sample gradients win).
SLICED_MAX_POSITIONS = 64

# -- export ------------------------------------------------------------------------------------------

#: Samples per step of the ``"loop"`` export form (:mod:`kernelwarehouse.export`): the loop runs
#: chunks of this many samples through the ``"grouped"`` graph of that batch, the rest one at a time.
#: Xeon-512, onnxruntime 1.32, 2 threads, KW-ResNet18 1x at batch 16, 224x224, medians of 5 against
#: torchvision's ResNet18 in the same rounds (a loaded machine): chunks of 1 4.42x, 4 3.14x, 8 2.94x,
#: 16 2.74x; the fixed-batch ``"grouped"`` graph 2.98x. 8 keeps batches of 8 to 15 off the
#: one-sample graph at a cost within the noise at 16.
EXPORT_LOOP_CHUNK = 8
