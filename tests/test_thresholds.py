"""The placed schedule's thresholds and the forgetting verdict, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from atu.errors import ConfigError
from atu.progress import FORGET_MARGIN, forgetting_verdict
from atu.thresholds import place_thresholds, quantile


def test_quantile_matches_linear_interpolation():
    v = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert quantile(v, 0.5) == pytest.approx(2.0)
    assert quantile(v, 0.9) == pytest.approx(3.6)  # 0.9 * 4 = 3.6 between 3 and 4
    assert quantile(v, 1.0) == pytest.approx(4.0)


def test_stages_step_down_evenly_from_start_to_floor():
    forget = [torch.tensor([0.2, 0.6, 0.8]), torch.tensor([0.1, 0.5])]
    retain = torch.tensor([[0.1, 0.0], [0.2, 0.1], [0.0, 0.2]])  # (M=3, R=2)
    p = place_thresholds(forget, retain, stages=2, start_quantile=1.0, floor_quantile=1.0)
    torch.testing.assert_close(p.start, torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(p.floor, torch.tensor([0.2, 0.2]))
    # row 0: 0.8 -> 0.5 -> 0.2; row 1: 0.5 -> 0.35 -> 0.2
    torch.testing.assert_close(p.taus, torch.tensor([[0.5, 0.35], [0.2, 0.2]]))
    assert not p.idle.any()


def test_a_row_that_does_not_stand_out_stays_at_its_start():
    forget = [torch.tensor([0.30, 0.31]), torch.tensor([0.9])]
    retain = torch.tensor([[0.3, 0.1], [0.3, 0.1]])
    p = place_thresholds(forget, retain, stages=3, start_quantile=1.0, floor_quantile=1.0, min_gap=0.02)
    assert p.idle.tolist() == [True, False]
    torch.testing.assert_close(p.taus[:, 0], torch.full((3,), 0.31))
    assert p.taus[-1, 1].item() == pytest.approx(0.1)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="retain_cos must be"):
        place_thresholds([torch.tensor([0.5])], torch.zeros(3, 2), 2, 0.9, 0.9)
    with pytest.raises(ValueError, match="no positions"):
        place_thresholds([torch.tensor([0.5])], torch.zeros(0, 1), 2, 0.9, 0.9)
    with pytest.raises(ValueError, match="at least one forget position"):
        place_thresholds([torch.empty(0)], torch.zeros(3, 1), 2, 0.9, 0.9)
    with pytest.raises(ValueError, match="stages"):
        place_thresholds([torch.tensor([0.5])], torch.zeros(3, 1), 0, 0.9, 0.9)


def test_verdict_needs_forget_texts_to_get_harder_than_retain_texts():
    failed, why = forgetting_verdict(1.05, 1.04, stages_kept=3)
    assert failed and "still predicts" in why
    failed, _ = forgetting_verdict(1.04 + FORGET_MARGIN + 0.01, 1.04, stages_kept=3)
    assert not failed
    failed, why = forgetting_verdict(3.0, 1.0, stages_kept=0)
    assert failed and "unchanged" in why
    failed, why = forgetting_verdict(None, 1.0, stages_kept=2)
    assert not failed and "no held-out forget texts" in why


def test_a_placed_plan_steps_past_the_floor_at_the_same_rate():
    from atu.plan import Plan

    p = place_thresholds([torch.tensor([0.8]), torch.tensor([0.3])], torch.tensor([[0.2, 0.3]]), 3, 1.0, 1.0)
    plan = Plan(list(p.taus), ["name", "contrast"], p, extra=2, concept_floor=torch.tensor([-1.0, -1.0]))
    assert plan.stage(2)[0].item() == pytest.approx(0.2)  # the floor
    assert plan.stage(3)[0].item() == pytest.approx(0.0, abs=1e-6)  # one step (0.2) past it
    assert plan.stage(4)[0].item() == pytest.approx(-0.2)
    assert plan.stage(3)[1].item() == pytest.approx(0.3)  # an idle row stays at its start
    assert plan.stage(5) is None
    assert Plan(list(p.taus), ["name"], None).stage(3) is None  # the absolute schedule has no extra stages


def test_the_floor_is_capped_by_the_concepts_own_cosines():
    # the retain texts reach as high as her texts: uncapped, nothing to push; capped at her median, the upper half
    forget = [torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])]
    retain = torch.tensor([[0.5], [0.1]])
    assert place_thresholds(forget, retain, 2, 1.0, 1.0).idle.tolist() == [True]
    p = place_thresholds(forget, retain, 2, 1.0, 1.0, cap_quantile=0.5)
    assert not p.idle.any() and p.floor.item() == pytest.approx(0.3)
    torch.testing.assert_close(p.taus[:, 0], torch.tensor([0.4, 0.3]))


def test_forgetting_is_measured_against_the_retain_texts():
    from atu.plan import specific_forgetting

    assert specific_forgetting({"heldout_forget_ppl_ratio": 2.2, "rise": 0.10}) == pytest.approx(2.0)
    assert specific_forgetting({"heldout_forget_ppl_ratio": 2.0, "rise": -0.2}) == pytest.approx(2.5)
    assert specific_forgetting({"heldout_forget_ppl_ratio": None, "rise": 0.0}) is None


def test_from_the_floor_the_schedule_goes_on_while_forgetting_progresses():
    from atu.plan import Plan, floor_progress
    from atu.unlearn import UnlearnConfig

    p = place_thresholds([torch.tensor([0.8])], torch.tensor([[0.2]]), 2, 1.0, 1.0)
    plan = Plan(list(p.taus), ["name"], p, extra=6, concept_floor=torch.tensor([-1.0]))
    cfg = UnlearnConfig(progress_min=0.05, progress_patience=2)

    def at(*ratios, rises=None):
        rises = rises or [0.0] * len(ratios)
        records = zip(ratios, rises, strict=True)
        stages = [{"stage": i, "heldout_forget_ppl_ratio": r, "rise": u} for i, (r, u) in enumerate(records)]
        return floor_progress(stages, plan, cfg)

    assert at(1.5) == at() == type(at())()  # before the floor: nothing to say
    assert at(1.5, 1.6).stop is None and at(1.5, 1.6).best == 1  # the floor stage is the first best
    assert at(1.5, 1.6, 1.62).best == 1  # +1.25%: not better by 5%
    assert at(1.5, 1.6, 1.62).stop is None  # one stage that does not progress is not a stop
    late = at(1.5, 1.6, 1.62, 1.7)  # +6% on the best: the new best, and the count starts again
    assert late.stop is None and late.best == 3
    flat = at(1.5, 1.6, 1.62, 1.4)  # two in a row that do not beat stage 1: stop there
    assert flat.stop and "levelled off" in flat.stop and flat.best == 1
    # her texts got harder, but retain texts as much: the model got worse at everything, it did not forget more
    assert at(1.5, 1.6, 1.8, 1.9, rises=[0.0, 0.0, 0.125, 0.19]).best == 1
    no_heldout = at(None, None)
    assert no_heldout.stop and "no held-out forget texts" in no_heldout.stop and no_heldout.best is None
    absolute = Plan(list(p.taus), ["name"], None)  # the paper's schedule runs its taus to the end
    assert floor_progress([{"stage": 1, "heldout_forget_ppl_ratio": 1.0, "rise": 0}], absolute, cfg).stop is None


def test_refining_a_stage_halves_the_step_from_there_on_and_keeps_the_floor():
    from atu.plan import Plan

    # start 0.8, floor 0.2, three stages: 0.6, 0.4, 0.2, then steps of 0.2 past the floor; the second row is idle
    p = place_thresholds([torch.tensor([0.8]), torch.tensor([0.3])], torch.tensor([[0.2, 0.3]]), 3, 1.0, 1.0)
    plan = Plan(list(p.taus), ["name", "contrast"], p, extra=2, concept_floor=torch.tensor([-1.0, -1.0]))

    def firsts(n):
        return [round(plan.stage(k)[0].item(), 4) for k in range(n)]

    assert firsts(5) == [0.6, 0.4, 0.2, 0.0, -0.2] and plan.stage(5) is None
    plan.refine(1)  # stage 1 broke the budget: halfway between 0.6 and 0.4, and half steps from there on
    assert firsts(8) == [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1] and plan.stage(9) is None
    assert plan.stage(7)[1].item() == pytest.approx(0.3)  # the idle row stays at its start
    plan.refine(0)  # from the start: 0.8 -> 0.7
    assert firsts(3) == [0.7, 0.6, 0.55]
    past = Plan(list(p.taus), ["name"], p, extra=3, concept_floor=torch.tensor([0.1, -1.0]))
    past.refine(4)  # past the floor, after one stage there (0.0 for the first row, which stops at its own 0.1)
    assert [round(past.stage(k)[1].item(), 4) for k in range(3)] == [0.3] * 3
    assert [round(past.stage(k)[0].item(), 4) for k in range(5)] == [0.6, 0.4, 0.2, 0.1, 0.1]
    assert past.stage(7) is not None and past.stage(8) is None  # the two stages left (4, 5) are four half ones
    with pytest.raises(ValueError):
        Plan(list(p.taus), ["name"], None).refine(0)  # the absolute schedule halves the rate instead


class Bigram(torch.nn.Module):
    """A language model whose next-token logits are a table row of the current token: each probability is known."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_the_budget_can_read_only_the_tokens_the_model_could_predict():
    from atu.progress import HeldOut

    table = torch.zeros(5, 5)
    table[1, 2] = 6.0  # after 1 comes 2 with p ~ 0.94; every other next token is uniform (p 0.2)
    ids = torch.tensor([[1, 2, 3, 1, 2, 0], [4, 1, 2, 4, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    held = HeldOut([], [(ids, attn)])
    model = Bigram(table.clone())
    full = held.retain_perplexity(model)
    assert held.keep_predictable(model, 0.5) == pytest.approx(3 / 8)  # the three 1 -> 2 of the eight next tokens
    p12 = torch.softmax(table[1], 0)[2]
    assert held.retain_perplexity(model) == pytest.approx(float(1 / p12), rel=1e-5)
    with torch.no_grad():  # a change to what the model could never predict moves only the full perplexity
        model.table[3] = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0])
        model.table[4, 0] = -2.0
    assert held.retain_perplexity(model) == pytest.approx(float(1 / p12), rel=1e-5)
    assert HeldOut([], [(ids, attn)]).retain_perplexity(model) != pytest.approx(full, rel=1e-3)
    with torch.no_grad():  # and a change to what it could predict moves the budget's perplexity
        model.table[1, 2] = 2.0
    assert held.retain_perplexity(model) > 1.5 / p12
    assert held.keep_predictable(model, 0.99) == 0  # nothing that sure: the budget reads every token again
    assert held.retain_perplexity(model) == pytest.approx(HeldOut([], [(ids, attn)]).retain_perplexity(model))
    from atu.unlearn import UnlearnConfig

    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="budget_min_prob"):
            UnlearnConfig(budget_min_prob=bad)
