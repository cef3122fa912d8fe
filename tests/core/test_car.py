"""CaR's pieces checked in isolation: the recurrence, the template ensemble, painting, merging, mask matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ovseg_ros.core.segmenters.car import (
    CAR_BACKGROUND,
    CAR_TEMPLATES,
    match_external_masks,
    masks_from_labels,
    merge_referring_masks,
    paint_labels,
    run_recurrence,
    step_limit,
    template_ensemble,
    unary_labels,
)
from ovseg_ros.core.vocabulary import UNLABELED


# --- data -------------------------------------------------------------------------------------------------
def test_templates_and_background_words_are_the_authors() -> None:
    assert len(CAR_TEMPLATES) == 15 and CAR_TEMPLATES[0] == "a clean origami {}."
    assert all("{}" in t for t in CAR_TEMPLATES) and len(set(CAR_TEMPLATES)) == 15
    assert len(CAR_BACKGROUND) == 23 and "keyboard" not in CAR_BACKGROUND and "helmet" in CAR_BACKGROUND


# --- the ensemble -----------------------------------------------------------------------------------------
def test_template_ensemble_equals_direct_double_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)  # Q=3 queries, T=5 templates
    got = template_ensemble(img, text, 100.0)
    expected = torch.zeros(4, 3)
    for n in range(4):
        summed = torch.zeros(3)
        for t in range(5):
            logits = torch.tensor([100.0 * float(img[n] @ text[q, t]) for q in range(3)])
            summed += torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
        expected[n] = torch.exp(summed) / torch.exp(summed).sum()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(4))
    # the second softmax squashes: probabilities stay within exp(±T) ratios, unlike one softmax
    assert float(got.max() / got.min()) <= float(np.exp(5)) + 1e-3


def test_single_template_is_one_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 1, 8, generator=g), dim=-1)
    assert torch.allclose(template_ensemble(img, text, 50.0), (50.0 * img @ text[:, 0].T).softmax(-1))


# --- the recurrence ---------------------------------------------------------------------------------------
def _fixed(diags: dict[tuple[int, ...], list[float]]):
    """A scorer whose diagonal for each live set is given (off-diagonal: whatever makes rows sum to 1)."""

    def score(props: torch.Tensor, active: list[int]) -> torch.Tensor:
        d = torch.tensor(diags[tuple(active)])
        p = torch.diag(d)
        if len(active) > 1:
            p = p + (1 - torch.eye(len(active))) * ((1 - d) / (len(active) - 1)).view(-1, 1)
        return p

    return score


def _proposals(calls: list):
    def propose(active: list[int], step: int) -> torch.Tensor:
        calls.append((tuple(active), step))
        return torch.stack([torch.full((4, 4), float(q + 1) / 10) for q in active])  # row value identifies q

    return propose


def test_survivors_hand_computed() -> None:
    """5 queries, θ = 0.3: step 1 keeps {1, 3, 4}; step 2 keeps {1, 4}; step 3 keeps both -> stop."""
    diags = {(0, 1, 2, 3, 4): [0.1, 0.5, 0.2, 0.31, 0.4], (1, 3, 4): [0.6, 0.3, 0.35], (1, 4): [0.7, 0.4]}
    calls: list = []
    res = run_recurrence(5, _proposals(calls), _fixed(diags), 0.3)
    assert [s.survivors for s in res.steps] == [(1, 3, 4), (1, 4), (1, 4)]
    assert [c[0] for c in calls] == [(0, 1, 2, 3, 4), (1, 3, 4), (1, 4)]
    assert res.queries == [1, 4]
    assert res.scores.tolist() == pytest.approx([0.7, 0.4])
    assert res.proposals[:, 0, 0].tolist() == pytest.approx([0.2, 0.5])  # each query keeps its own proposal


def test_unchanged_live_set_stops_without_repeating_a_step() -> None:
    diags = {(0, 1, 2): [0.1, 0.5, 0.6], (1, 2): [0.5, 0.5]}
    calls: list = []
    res = run_recurrence(3, _proposals(calls), _fixed(diags), 0.3)
    assert len(calls) == 2 and res.queries == [1, 2]  # the authors would run (1, 2) a third time
    # ... unless step 1 differs from later steps (raw CAM names): then all-survive at step 1 runs step 2
    calls.clear()
    res = run_recurrence(2, _proposals(calls), _fixed({(0, 1): [0.5, 0.5]}), 0.3, step_dependent=True)
    assert [c[1] for c in calls] == [1, 2] and res.queries == [0, 1]


@pytest.mark.parametrize("seed", range(40))
def test_loop_terminates_shrinks_monotonically_and_respects_the_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    table: dict[tuple[int, ...], list[float]] = {}

    def score(props: torch.Tensor, active: list[int]) -> torch.Tensor:
        key = tuple(active)
        if key not in table:  # the same live set always scores the same (the model is deterministic)
            table[key] = list(rng.uniform(0, 1, len(active)))
        return torch.diag(torch.tensor(table[key]))

    for dependent in (False, True):
        calls: list = []
        res = run_recurrence(n, _proposals(calls), score, float(rng.uniform(0.2, 0.8)), step_dependent=dependent)
        sets = [set(c[0]) for c in calls]
        assert all(b <= a for a, b in zip(sets, sets[1:]))  # monotone shrinking
        assert all(len(b) < len(a) for a, b in zip(sets[1 + dependent:], sets[2 + dependent:]))
        assert len(calls) <= (n + 1 if dependent else n) <= step_limit(n)
        assert set(res.queries) <= sets[-1] and len(res.queries) >= 1


def test_empty_first_step_continues_with_the_best_query_as_the_authors_loop() -> None:
    """Issue 11: the authors' ``_filter_texts`` appends the best query to the survivor list in place, so it
    counts as a positive and step 2 runs on it alone (scoring 1 in a softmax over one query)."""
    diags = {(0, 1, 2): [0.1, 0.25, 0.2], (1,): [1.0]}
    calls: list = []
    res = run_recurrence(3, _proposals(calls), _fixed(diags), 0.6)
    assert [c[0] for c in calls] == [(0, 1, 2), (1,)]  # the old loop stopped after step 1
    assert res.queries == [1] and res.scores.tolist() == [1.0]
    assert float(res.proposals[0, 0, 0]) == pytest.approx(0.2)  # query 1's step-2 proposal
    assert [s.survivors for s in res.steps] == [(1,), (1,)]


def test_later_empty_step_continues_with_the_best_until_the_count_settles() -> None:
    """Step 2 keeps nobody: the best (query 0) is kept and counted (1 != 2), so step 3 runs on it; there it
    fails θ again but is kept and counted again (1 == 1): stop, query 0 with its own score (as all_scores)."""
    diags = {(0, 1, 2): [0.5, 0.6, 0.1], (0, 1): [0.2, 0.1], (0,): [0.25]}
    res = run_recurrence(3, _proposals([]), _fixed(diags), 0.3)
    assert [s.queries for s in res.steps] == [(0, 1, 2), (0, 1), (0,)]
    assert res.queries == [0] and res.scores.tolist() == [0.25]


def test_all_zero_scores_stop_at_once() -> None:
    res = run_recurrence(2, _proposals([]), _fixed({(0, 1): [0.0, 0.0]}), 0.3)
    assert len(res.steps) == 1 and res.scores.tolist() == [0.0, 0.0]


def test_max_steps_caps_and_zero_scores_the_dropped() -> None:
    diags = {(0, 1, 2): [0.5, 0.6, 0.1], (0, 1): [0.2, 0.9]}
    res = run_recurrence(3, _proposals([]), _fixed(diags), 0.3, max_steps=2)
    assert len(res.steps) == 2 and res.queries == [0, 1] and res.scores.tolist() == pytest.approx([0.0, 0.9])
    assert step_limit(10) == 11 and step_limit(10, 3) == 3 and step_limit(2, 9) == 3


def _zero_after_step_1(active: list[int], step: int) -> torch.Tensor:
    if step == 1:
        return torch.stack([torch.full((2, 2), float(q + 1)) for q in active])
    return torch.zeros((len(active), 2, 2))


def test_all_zero_proposals_are_scored_as_proposed_then_replaced_by_the_live_rows() -> None:
    seen = []

    def score(props: torch.Tensor, active: list[int]) -> torch.Tensor:
        seen.append(props[:, 0, 0].tolist())
        return torch.eye(len(active)) * (0.9 if len(active) < 3 else torch.tensor([0.9, 0.1, 0.9]))

    res = run_recurrence(3, _zero_after_step_1, score, 0.3)
    assert seen[1] == [0.0, 0.0]  # the authors score the empty proposals (unprompted images)
    assert res.queries == [0, 2] and res.proposals[:, 0, 0].tolist() == [1.0, 3.0]  # fix: the live rows
    ref = run_recurrence(3, _zero_after_step_1, score, 0.3, reuse_whole_stack=True)
    # the authors' code keeps the whole previous stack: row 1 (query 1's) is paired with query 2
    assert ref.queries == [0, 2] and ref.proposals[:, 0, 0].tolist() == [1.0, 2.0, 3.0]


# --- refinement, painting, merging ------------------------------------------------------------------------
def test_unary_labels_and_one_mask_per_query() -> None:
    p = torch.zeros((3, 2, 3))
    p[0, 0, 0] = 0.9
    p[1, 1, 1] = 0.8
    lab = unary_labels(p)
    assert lab.tolist() == [[1, 0, 0], [0, 2, 0]]
    masks = masks_from_labels(lab, 3)
    assert masks.shape == (3, 2, 3) and not masks[2].any()  # the third query wins nothing but keeps a mask


def test_paint_order_stuff_then_things_by_ascending_score() -> None:
    h, w = 4, 4
    masks = np.zeros((4, h, w), dtype=bool)
    masks[0] = True  # stuff "wall", score 0.9: painted first although it scores highest
    masks[1, :2] = True  # thing "chair", 0.2
    masks[2, :, :2] = True  # thing "person", 0.5: painted after chair, wins their overlap
    masks[3, 3] = True  # thing with score 0: never painted
    scores = np.array([0.9, 0.2, 0.5, 0.0], dtype=np.float32)
    labels, conf = paint_labels(masks, scores, [True, False, False, False])
    assert labels[0, 0] == 2 and labels[0, 3] == 1 and labels[3, 3] == 0 and labels[2, 3] == 0
    assert conf[0, 0] == pytest.approx(0.5) and conf[3, 3] == pytest.approx(0.9)
    stuff_last, _ = paint_labels(masks, scores, [True, False, False, True])  # class 3 as stuff, score 0
    assert (stuff_last == labels).all()
    empty, _ = paint_labels(np.zeros((2, 2, 2), bool), np.array([0.5, 0.0], np.float32), [False, False])
    assert (empty == UNLABELED).all()


def test_referring_merge_rules() -> None:
    h, w = 10, 10
    m = torch.zeros((3, h, w), dtype=torch.bool)
    m[0, :5] = True
    m[1, :6] = True
    m[2, 8:] = True
    s = torch.tensor([0.5, 0.3, 0.2])
    merged = merge_referring_masks(m, s)
    # weighted mean: rows 0-4 -> 0.8, row 5 -> 0.3, rows 8-9 -> 0.2; >= 0.5 keeps rows 0-4
    assert merged[:5].all() and not merged[5:].any()
    # coverage at most 5 %: the union instead
    tiny = torch.zeros((2, h, w), dtype=torch.bool)
    tiny[0, 0, 0] = True
    tiny[1, 9, :4] = True
    u = merge_referring_masks(tiny, torch.tensor([0.9, 0.1]))
    assert int(u.sum()) == 5 and u[0, 0] and u[9, :4].all()
    # all scores zero (nothing survived): the union
    assert torch.equal(merge_referring_masks(m, torch.zeros(3)), m.any(0))


def test_external_masks_matched_by_iom_then_iou() -> None:
    h, w = 20, 20
    car = torch.zeros((3, h, w), dtype=torch.bool)
    car[0, 2:10, 2:10] = True  # a box; the source has two halves that together equal it (plus one pixel)
    car[1, 12:18, 12:18] = True  # nothing in the source resembles it
    cand = torch.zeros((4, h, w), dtype=torch.bool)
    cand[0, 2:10, 2:6] = True
    cand[1, 2:10, 6:10] = True
    cand[1, 10, 9] = True
    cand[2, 12:14, 0:20] = True  # overlaps mask 1 a little, is mostly elsewhere
    cand[3, 0:20, 0:20] = True  # the whole image contains mask 0: IoM 1 via |∩|/|mask|
    out = match_external_masks(car, cand, iom_threshold=0.6, min_pred_threshold=0.05, matching_threshold=0.5)
    # for mask 0: candidates 0, 1 (IoM 1 through their own area) and 3 (IoM 1 through the mask's area) match;
    # their union is the whole image, IoU 64/400 < 0.5: the mask stays
    assert torch.equal(out[0], car[0])
    out = match_external_masks(car, cand[:3], iom_threshold=0.6, min_pred_threshold=0.05, matching_threshold=0.5)
    assert torch.equal(out[0], cand[0] | cand[1])  # snapped to the source's halves (with the extra pixel)
    assert torch.equal(out[1], car[1])  # best candidate (2) has a low IoU: kept
    assert not out[2].any()  # empty masks are left alone
    # min_pred_threshold: a huge candidate touching 1 pixel of the mask gets no credit from its own area
    c2 = torch.zeros((1, h, w), dtype=torch.bool)
    c2[0, 9:, 9:] = True
    out = match_external_masks(car[:1], c2, 0.6, min_pred_threshold=0.05, matching_threshold=0.0)
    assert torch.equal(out[0], c2[0])  # no candidate passes: the best one is used, IoU > 0 accepts it


@pytest.mark.parametrize("k", [1, 2, 4])
def test_paint_is_a_permutation_invariant_of_the_class_order(k: int) -> None:
    rng = np.random.default_rng(k)
    masks = rng.random((k, 5, 5)) > 0.5
    scores = rng.permutation(np.linspace(0.1, 0.9, k)).astype(np.float32)
    base, _ = paint_labels(masks, scores, [False] * k)
    for perm in itertools.permutations(range(k)):
        perm = list(perm)
        lab, _ = paint_labels(masks[perm], scores[perm], [False] * k)
        mapped = np.where(lab >= 0, np.array(perm)[np.maximum(lab, 0)], UNLABELED)
        assert (mapped == base).all()
