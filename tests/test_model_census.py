"""The model-zoo census (tests/model_census.py) against its recorded outcomes (tests/model_census_expected.json).

Every causal-LM family of the pinned transformers, tiny, `plan="auto"`, at tp 2 and 4 and under SP, vs the
dense model: logits, the labels loss and every parameter's gradient. Fails on any silent mismatch, on any crash the record does not already hold, on any family
whose outcome drops (match -> refused, refused -> crash), and on any change at all that the record does not
hold yet (an improvement is recorded by regenerating the file; the message prints the command). One world
per tp size runs every family (no process per family).

The record holds the torch and transformers versions it was made with. Under other versions (CI also runs
the suite on torch 2.11) the census still runs and still fails on any mismatch or on a crash the record
does not hold, but other changes of status against the record (a family that builds or refuses differently
there) are not checked.
"""

from __future__ import annotations

import json

import model_census
import pytest

pytest.importorskip("transformers")

# Better is higher; a mismatch is never accepted, and a crash only where the record holds it.
_RANK = {"mismatch": 0, "crash": 1, "refused": 2, "match": 3}


def compare(
    expected: dict[str, dict[str, str]], got: dict[str, dict[str, str]]
) -> tuple[list[str], list[str]]:
    """(failures, changes to record) between the recorded statuses and this run's."""
    failures, changes = [], []
    for family in sorted(set(expected) | set(got)):
        if family not in got:
            changes.append(f"{family}: recorded, but transformers no longer registers it")
            continue
        if family not in expected:
            changes.append(f"{family}: new family, not recorded ({got[family]})")
            for setting, status in got[family].items():
                if status in ("mismatch", "crash"):
                    failures.append(f"{family} {setting}: {status}")
            continue
        want, have = expected[family], got[family]
        for setting in sorted(set(want) | set(have)):
            w, h = want.get(setting, "not run"), have.get(setting, "not run")
            if h == "mismatch" or (h == "crash" and w != "crash"):
                failures.append(f"{family} {setting}: {h} (recorded: {w})")
            elif w != h and w in _RANK and h in _RANK and _RANK[h] < _RANK[w]:
                failures.append(f"{family} {setting}: dropped from {w} to {h}")
            elif w != h:
                changes.append(f"{family} {setting}: {w} -> {h}")
    return failures, changes


def test_compare_flags_drops_and_silent_errors():
    """The checker itself: drops, mismatches and new crashes fail; improvements are changes to record."""
    expected = {
        "a": {"tp2": "match"},
        "b": {"tp2": "refused"},
        "c": {"tp2": "crash"},
        "d": {"tp2": "match"},
        "e": {"build": "not buildable"},
    }
    # c and e as recorded; a dropped, b improved, d mismatched, f new
    got = {**expected, "a": {"tp2": "refused"}, "b": {"tp2": "match"}, "d": {"tp2": "mismatch"}}
    got["f"] = {"tp2": "crash"}
    failures, changes = compare(expected, got)
    assert failures == [
        "a tp2: dropped from match to refused",
        "d tp2: mismatch (recorded: match)",
        "f tp2: crash",
    ]
    assert changes == ["b tp2: refused -> match", "f: new family, not recorded ({'tp2': 'crash'})"]


@pytest.mark.parametrize("change", ["none", "scaled", "missing", "extra"])
def test_gradient_check_flags_wrong_gradients(change):
    """The census's gradient comparison: a wrong, missing or unexpected gradient is a mismatch."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    if change == "scaled":
        ref["1.weight"] *= 1.01
    elif change == "missing":
        model[0].bias.grad = None
    elif change == "extra":
        del ref["0.weight"]
    outcome, reason = model_census._compare_grads(model, ref)
    if change == "none":
        assert (outcome, reason) == ("match", "")
    else:
        assert outcome == "mismatch" and reason.startswith("grad "), reason


def test_targets_flag_low_coverage():
    """The coverage check itself: a tp size where too few families match is named."""
    results = {
        f"f{i}": {"built": True, "tp_plan": i < 2, "tp2": ("match", ""), "tp4": ("match", "")}
        for i in range(10)
    }
    assert model_census.below_targets(results) == []
    results["f0"]["tp4"] = ("refused", "why")
    assert model_census.below_targets(results) == [
        "tp 4: 1 of 2 families (with_tp_plan) match, under the target 95%"
    ]
    for i in range(1, 4):
        results[f"f{i}"]["tp2"] = ("refused", "why")
    assert (
        model_census.below_targets(results)[0] == "tp 2: 7 of 10 families (all) match, under the target 80%"
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_model_census_matches_record():
    results = model_census.run_census()
    got = model_census.statuses(results)
    expected = json.loads(model_census.EXPECTED.read_text())
    recorded_with = expected.pop(model_census.VERSIONS_KEY, None)
    if recorded_with != model_census.versions():
        # Other versions: the record's statuses are not this run's, but a silent error always fails, and so
        # does a crash the record does not hold.
        bad = [
            f"{f} {k}: {v}"
            for f, e in sorted(got.items())
            for k, v in e.items()
            if v == "mismatch" or (v == "crash" and expected.get(f, {}).get(k) != "crash")
        ]
        assert not bad, (
            f"model census (versions {model_census.versions()}, record made with {recorded_with}): "
            "silently wrong, or a crash the record does not hold:\n  " + "\n  ".join(bad)
        )
        return
    failures, changes = compare(expected, got)
    assert not model_census.below_targets(results), (
        "model census: coverage under its targets:\n  " + "\n  ".join(model_census.below_targets(results))
    )
    how = (
        f"\nIf the changes are intended, record them: {model_census.WRITE_COMMAND} "
        "(rewrites tests/model_census_expected.json and docs/model-support.md)"
    )
    reasons = {
        f: {k: v[1] for k, v in e.items() if isinstance(v, (list, tuple)) and v[1]}
        for f, e in results.items()
    }
    assert not failures, (
        "model census: silently wrong, crashed or dropped:\n  "
        + "\n  ".join(f"{line}  [{reasons.get(line.split()[0], {})}]" for line in failures)
        + how
    )
    assert not changes, "model census: outcomes changed from the record:\n  " + "\n  ".join(changes) + how
