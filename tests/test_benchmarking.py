"""The measuring helpers the benchmark scripts share (pixcell_ext.benchmarking): what they count, not how fast."""

import torch
import torch.nn.functional as F

from pixcell_ext import benchmarking


class Attention(torch.nn.Module):
    """Stands in for the transformer: attention only, with diffusers' checkpointing switch."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = True
        self.switches = []

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True
        self.switches.append(True)

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.switches.append(False)


def test_cpu_attention_is_counted_with_checkpointing_off_and_restored(one_thread):
    transformer = Attention()
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    seen = []

    def step() -> None:
        seen.append(transformer.gradient_checkpointing)
        F.scaled_dot_product_attention(q, k, v)

    flops = benchmarking.count_flops(step, transformer)
    # Q K^T and (softmax) V: two [16 x 8] x [8 x 16]-sized matmuls per head, 2 FLOPs per multiply-add.
    assert flops == 2 * (2 * 1 * 2 * 16 * 16 * 8)
    assert seen == [False] and transformer.gradient_checkpointing and transformer.switches == [False, True]


def test_paired_ratio_is_the_median_and_quartiles_of_per_round_ratios():
    slow, fast = [4.0, 9.0, 2.0, 8.0, 3.0], [1.0, 3.0, 2.0, 2.0, 1.0]  # ratios 4, 3, 1, 4, 3
    med, q1, q3 = benchmarking.paired_ratio(slow, fast)
    assert med == 3.0 and q1 == 2.0 and q3 == 4.0
    assert benchmarking.paired_ratio([2.0], [1.0]) == (2.0, 2.0, 2.0)


def test_time_rounds_rotates_the_order_and_drops_warmup():
    order = []
    steps = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = benchmarking.time_rounds(steps, repeats=2, warmup=1, device=torch.device("cpu"))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2, "c": 2}
