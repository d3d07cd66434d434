"""Everything CPU-specific about inference: what the CPU can do, the fast mode built from that, threads, memory.

The network (`caption_model.modeling`) knows nothing of this package; `ImageCaptioner.quantize_int8()` is the thin
entry point that hands the model to `fast_mode.apply_fast_mode`.

    features.py      CPU flags (/proc/cpuinfo, capped as torch is) -> which int8 / bf16 kernels are native
    int8.py          the decoder's per-token weights as int8 / fp16 (the one place that calls torch's quantisation API)
    encoder_graph.py the ResNet with BatchNorm folded, as one oneDNN-fused TorchScript graph
    fast_mode.py     which fast mode this CPU gets (int8-vnni, int8-avx2, fp32), put together on a model
    memory.py        hands freed weight memory back to the OS
    threads.py       how many threads inference should use
"""
