"""Scores and masks on hand-computed inputs where the plausible wrong formulas disagree."""

import pytest
import torch
from torch import nn

from streamprune.config import PruneConfig
from streamprune.masking import n_m_mask, pruned_per_row, row_mask, zero_fraction
from streamprune.methods import get_method
from streamprune.stats import ActivationNorms, input_statistics


def mask_for(weight, inputs, **options):
    """The keep-mask of a linear layer `weight` after the tokens `inputs` went through it (hooks and all),
    as the method of the registry decides it."""
    weight = torch.tensor(weight, dtype=torch.float32)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    config = PruneConfig.of(calib="unused", **options)
    with input_statistics(linear, config.statistics) as statistics:
        linear(torch.tensor(inputs, dtype=torch.float32))
    decision = get_method(config.method).decide(linear.weight, statistics[""], config, "weight")
    return decision.keep.int().tolist()


def test_wanda_uses_the_unsquared_l2_norm():
    # mean x^2 = [4, 1]: L2 = [2, 1], L2^2 = [4, 1]; with |W| = [1, 3] the two orders disagree.
    tokens = [[2.0, 1.0], [-2.0, -1.0]]
    weight = [[1.0, 3.0]]
    assert mask_for(weight, tokens, method="wanda", sparsity=0.5) == [[0, 1]]  # scores 2, 3
    assert mask_for(weight, tokens, method="en-original", alpha=0.0, sparsity=0.5) == [[1, 0]]  # scores 4, 3


def test_ranking_is_per_output_row_not_per_layer():
    weight = [[1.0, 2.0], [10.0, 20.0]]
    tokens = [[1.0, 1.0]]
    # per row: each row drops its smaller entry; a layer-wide ranking would drop all of row 0.
    assert mask_for(weight, tokens, method="wanda", sparsity=0.5) == [[0, 1], [0, 1]]
    weight = [[2.0, 1.0], [10.0, 20.0]]
    assert mask_for(weight, tokens, method="magnitude", sparsity=0.5) == [[1, 0], [0, 1]]


def test_mean_and_sum_statistics_differ_when_alpha_mixes_l1_and_l2():
    # feature 0: [2, 2, 2, 2] -> sum|x| = 8, sum x^2 = 16, mean|x| = 2, mean x^2 = 4
    # feature 1: [4, 0, 0, 0] -> sum|x| = 4, sum x^2 = 16, mean|x| = 1, mean x^2 = 4
    tokens = [[2.0, 4.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]
    weight = [[1.0, 1.4]]
    # en-modified, a = 0.5.  mean: scales [.5*2 + .5*2, .5*1 + .5*2] = [2, 1.5] -> scores [2, 2.1]
    assert mask_for(weight, tokens, method="en-modified", alpha=0.5, sparsity=0.5, stat_norm="mean") == [[0, 1]]
    # sum: scales [.5*8 + .5*4, .5*4 + .5*4] = [6, 4] -> scores [6, 5.6]
    assert mask_for(weight, tokens, method="en-modified", alpha=0.5, sparsity=0.5, stat_norm="sum") == [[1, 0]]
    # en-original, a = 0.5, mean: scales [.5*2 + .5*4, .5*1 + .5*4] = [3, 2.5] -> scores [3, 3.5]
    assert mask_for(weight, tokens, method="en-original", alpha=0.5, sparsity=0.5, stat_norm="mean") == [[0, 1]]
    # en-original, sum: scales [.5*8 + .5*16, .5*4 + .5*16] = [12, 10] -> scores [12, 14]
    assert mask_for(weight, tokens, method="en-original", alpha=0.5, sparsity=0.5, stat_norm="sum") == [[0, 1]]


def test_alpha_one_is_the_l1_norm_in_both_geometries():
    # f0 = [3, 0, 0], f1 = [1, 1, -1]: mean|x| = [1, 1], mean x^2 = [3, 1], L2 = [1.73, 1]
    tokens = [[3.0, 1.0], [0.0, 1.0], [0.0, -1.0]]
    weight = [[0.7, 1.0]]  # L1 scores [0.7, 1] -> drop f0;  L2 scores [1.21, 1] -> drop f1
    for method in ("en-original", "en-modified"):
        assert mask_for(weight, tokens, method=method, alpha=1.0, sparsity=0.5) == [[0, 1]]
    assert mask_for(weight, tokens, method="wanda", sparsity=0.5) == [[1, 0]]


def test_row_mask_prunes_floor_of_sparsity_times_inputs_with_stable_ties():
    scores = torch.ones(3, 10)
    keep = row_mask(scores, 0.29)  # floor(2.9) = 2, not the 28.999.. rounding trap at 100 inputs
    assert keep.tolist() == [[False, False] + [True] * 8] * 3
    assert pruned_per_row(100, 0.29) == 29
    assert pruned_per_row(576, 0.5) == 288
    assert row_mask(torch.rand(4, 7), 0.0).all()
    keep = row_mask(torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]]), 0.6)
    assert keep.tolist() == [[True, False, True, False, False]]


def test_row_mask_is_exactly_a_stable_sort_even_with_many_ties():
    def by_stable_sort(scores, sparsity):
        k = pruned_per_row(scores.shape[1], sparsity)
        keep = torch.ones_like(scores, dtype=torch.bool)
        return keep.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)

    generator = torch.Generator().manual_seed(0)
    for levels, sparsity in [(3, 0.5), (5, 0.6), (1000, 0.5), (2, 0.29)]:
        scores = torch.randint(0, levels, (64, 100), generator=generator).float()  # quantized: ties everywhere
        assert torch.equal(row_mask(scores, sparsity), by_stable_sort(scores, sparsity))
    scores = torch.rand(8, 4096, generator=generator)
    assert torch.equal(row_mask(scores, 0.5), by_stable_sort(scores, 0.5))


def test_zero_fraction_counts_negative_zero_as_zero():
    assert zero_fraction(torch.tensor([[0.0, -0.0, 1.0, 2.0], [3.0, 0.0, 4.0, 5.0]], dtype=torch.float16)) == 3 / 8
    assert zero_fraction(torch.ones(3, 3)) == 0.0


def test_two_four_on_weights_one_to_eight():
    scores = torch.arange(1, 9, dtype=torch.float32).reshape(1, 8)
    assert (scores * n_m_mask(scores, 2, 4)).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]
    scores = torch.tensor([[8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]])
    assert n_m_mask(scores, 2, 4).int().tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]
    # 4:8 keeps the 4 highest of the whole group of 8, which 2:4 cannot
    scores = torch.arange(1, 9, dtype=torch.float32).reshape(1, 8)
    assert n_m_mask(scores, 4, 8).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_two_four_follows_activations_not_just_weights():
    weight = [[1.0, 2.0, 3.0, 4.0]]
    tokens = [[10.0, 10.0, 1.0, 1.0]]  # L2 = [10, 10, 1, 1] -> scores [10, 20, 3, 4]
    assert mask_for(weight, tokens, method="wanda", pattern="2:4") == [[1, 1, 0, 0]]
    assert mask_for(weight, tokens, method="magnitude", pattern="2:4") == [[0, 0, 1, 1]]


def test_statistics_hooks_accumulate_over_calls_and_are_removed():
    linear = nn.Linear(2, 1, bias=False)
    with input_statistics(linear) as statistics:
        linear(torch.tensor([[1.0, -2.0]]))
        linear(torch.tensor([[[3.0, 0.0], [-1.0, 2.0]]]))  # batch x time x features
    stat = statistics[""]
    assert stat.tokens == 3
    assert stat.abs_sum.tolist() == [5.0, 4.0]
    assert stat.sq_sum.tolist() == [11.0, 8.0]
    norms = stat.norms("mean")
    assert norms.l1.tolist() == pytest.approx([5 / 3, 4 / 3])
    assert not linear._forward_pre_hooks and not linear._forward_hooks
    assert "forward" not in linear.__dict__  # the statistics pass's shortcut is undone
    assert linear(torch.ones(1, 2)).abs().sum() > 0


def test_column_sums_add_chunks_in_float64_and_leave_the_input_alone(monkeypatch):
    from streamprune import stats

    monkeypatch.setattr(stats, "TOKEN_CHUNK", 2)  # three chunks of 2, 2 and 1 tokens
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 2.0], [0.25, -4.0], [2.0, 1.0]], dtype=torch.bfloat16)
    before = x.clone()
    abs_sum, sq_sum = stats.column_sums(x.reshape(1, 5, 2))
    assert abs_sum.dtype == sq_sum.dtype == torch.float64
    assert abs_sum.tolist() == [7.25, 9.5]
    assert sq_sum.tolist() == [1 + 9 + 1 + 0.0625 + 4, 4 + 0.25 + 4 + 16 + 1]
    assert torch.equal(x, before)
    single = x.float()  # float32 input: summed in float32, and not changed in place either
    assert [t.tolist() for t in stats.column_sums(single)] == [abs_sum.tolist(), sq_sum.tolist()]
    assert torch.equal(single, before.float())


class _TwoLinearsOneInput(nn.Module):
    """Feeds one tensor to two linears, like q/k/v or gate/up; optionally changes it in place between."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)

    def forward(self, x, change_between=False):
        out = self.first(x)
        if change_between:
            x.mul_(2)
        return out + self.second(x)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_linears_fed_one_tensor_share_its_sums_unless_it_changed_in_between(mode, monkeypatch):
    from streamprune import stats

    computed = []
    real = stats.column_sums
    monkeypatch.setattr(stats, "column_sums", lambda x: computed.append(1) or real(x))
    module = _TwoLinearsOneInput()
    with mode(), input_statistics(module) as statistics:
        module(torch.tensor([[1.0, -2.0]]))
        module(torch.tensor([[3.0, 1.0]]), change_between=True)
    assert statistics["first"].abs_sum.tolist() == [4.0, 3.0]
    assert statistics["second"].abs_sum.tolist() == [7.0, 4.0]
    assert statistics["second"].sq_sum.tolist() == [37.0, 8.0]
    # no_grad: shared in the first call, recomputed after the change; inference tensors have no version
    # counter to show a change, so under inference_mode every linear computes its own
    assert len(computed) == (3 if mode is torch.no_grad else 4)


def test_the_statistics_pass_shares_sums_as_blocks_run_in_production(tiny_checkpoint, monkeypatch):
    from streamprune import stats
    from streamprune.loading import open_model

    stack = open_model(tiny_checkpoint("llama", dtype="float32", layers=2), "cpu").stack
    acts = stack.embed(torch.randint(0, 256, (3, 8)), batch_size=2)  # two forwards: 2 rows, then 1
    block = stack.load_block(0)
    computed = []
    real = stats.column_sums
    monkeypatch.setattr(stats, "column_sums", lambda x: computed.append(1) or real(x))
    with input_statistics(block) as statistics:
        stack.run_block(0, acts, batch_size=2, write_back=False)
    # per forward: q/k/v share one computation, o one, gate/up one, down one (not 7)
    assert len(computed) == 2 * 4
    assert {name: stat.tokens for name, stat in statistics.items()} == dict.fromkeys(statistics, 24)
    assert [stat.first_call for stat in statistics.values()] == list(range(7))


def test_hooks_are_removed_when_the_forward_fails():
    linear = nn.Linear(2, 1)
    with pytest.raises(RuntimeError):
        with input_statistics(linear):
            linear(torch.ones(1, 3))
    assert not linear._forward_pre_hooks


def test_en_modified_at_zero_is_wanda_bit_for_bit():
    def scale(method, alpha=None):
        return get_method(method).scale(norms, {} if alpha is None else {"alpha": alpha})

    norms = ActivationNorms(l1=torch.rand(64, dtype=torch.float64), l2sq=torch.rand(64, dtype=torch.float64))
    assert torch.equal(scale("en-modified", 0.0), scale("wanda"))
    assert torch.equal(scale("en-modified", 1.0), scale("en-original", 1.0))
    assert not torch.equal(scale("en-original", 0.0), scale("wanda"))
