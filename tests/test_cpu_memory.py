"""The allocator setting for CPU training: a step's freed activations are reused without page faults."""

import subprocess
import sys
import textwrap

import pytest

from caption_model.cpu.memory import _glibc

# Ten training steps of the decoder's additive attention at the shapes preset's sizes (its (16, 12, 144, 128)
# energies are the largest tensor of a step after the convolutions), after five warm-up steps; prints the minor
# page faults those ten steps caused.
TRAIN_STEPS = textwrap.dedent("""
    import resource, sys, torch
    from caption_model.cpu.memory import keep_freed_memory_for_reuse
    from caption_model.modeling import AdditiveAttention
    if sys.argv[1] == "keep":
        assert keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    attention = AdditiveAttention(256, 128)
    hidden, visual = torch.randn(16, 12, 256, requires_grad=True), torch.randn(16, 144, 256, requires_grad=True)
    def step():
        context, alpha = attention(hidden, attention.project_keys(visual), visual)
        (context.square().mean() + alpha.square().mean()).backward()
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", TRAIN_STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's; elsewhere the setting is a documented no-op")
def test_training_steps_reuse_freed_memory_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert default > 10 * 2000  # glibc unmaps the large freed blocks: every step faults them in again (~10,000)
    assert kept < 10 * 200  # served from memory the process already holds
