"""Each experiment's one-sentence answer, ``answer(data, claims)``: generated from the numbers of
the committed default run (figures/results.json), its direction words computed from them, every
claim that does not reproduce named, and wired into the demo, REPORT.md and the README block."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest

from miniresnet import demo, experiments
from miniresnet.experiments import answers, report

pytestmark = pytest.mark.backends("numpy")

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = json.loads((ROOT / "figures" / "results.json").read_text())
#: experiments whose answer is still being written elsewhere (the lead empties this)
WITHOUT_ANSWER: set[str] = set()
ANSWERING = [n for n in experiments.EXPERIMENTS if hasattr(experiments.load(n), "answer")]
#: claims whose failure the answer states in its own words (computed from the same number)
#: rather than by naming the claim
STATED_IN_WORDS = {"he_healthy_norms_bn", "shortcut_live_rate_lam1.1",
                   "shortcut_live_rate_lam0.5"}


def committed(name):
    """Deep copies of ``name``'s data and claims in the committed run."""
    record = COMMITTED["experiments"].get(name)
    if record is None:
        pytest.skip(f"{name} is not in figures/results.json yet (the lead reruns the demo)")
    return copy.deepcopy(record["data"]), copy.deepcopy(record["claims"])


def answer(name, data, claims):
    return experiments.load(name).answer(data, claims)


def check_sentence(text):
    assert isinstance(text, str) and text.strip() == text and "\n" not in text
    assert text.endswith(".") and not text.endswith("..") and text[0].isupper()
    assert len(text.split()) <= 60, len(text.split())
    assert "|---" not in text  # no tables


def test_every_experiment_answers_its_question():
    missing = {n for n in experiments.EXPERIMENTS if not hasattr(experiments.load(n), "answer")}
    assert missing <= WITHOUT_ANSWER, missing


# ---------------------------------------------------------------------------- generated

def _set(path, value):
    """A mutation setting ``data[path[0]][path[1]]...`` to ``value`` (a path starting with
    "claims:ID" sets a field of that claim instead)."""
    def mutate(data, claims):
        target = data
        if path[0].startswith("claims:"):
            target = next(c for c in claims if c["id"] == path[0].partition(":")[2])
            path_ = path[1:]
        else:
            path_ = path
        for key in path_[:-1]:
            target = target[key]
        target[path_[-1]] = value
    return mutate


#: per experiment: a key number changed in the data or claims, and how it must then read
KEY_NUMBER = {
    "degradation": (_set(("final_train_loss", "plain", "7"), 2.345), answers.num(2.345)),
    "lesions": (_set(("nets", "resnet", "mean_drop"), 7.891), answers.num(7.891)),
    "paths_trained": (_set(("states", "trained", "veit_range"), [[4, 8]]), "4–8"),
    "orderings": (_set(("per_order", "bn_after_add", "final_test_acc"), [0.9234]),
                  answers.pct(0.9234)),
    "highway_vs_residual": (_set(("gate",), [0.3] * 9), "to 0.3 "),
    "norm_preservation": (_set(("mean_abs_log", "resnet", "12"), 0.1234), answers.num(0.1234)),
    "vanishing_exploding": (_set(("conv", "plain", "ratios"), [5.0, 5.0, 5.0]), "×5 "),
    "shattered_gradients": (_set(("acf1", "resnet_bn", "mean", -1), 0.4321),
                            answers.num(0.4321)),
    "paths_at_init": (_set(("veit_centre",), [18.0, 18.5]), answers.num(18.25)),
    "shortcut_scaling": (_set(("live_bn_rate", "1.1"), 1.234), answers.num(1.234)),
    "jacobian_spectra": (_set(("claims:plain_end_to_end_zero_directions", "measured"), 0.5555),
                         answers.pct(0.5555)),
    "init_schemes": (_set(("stats", "he", "ratio_per_block"), [1.9, 1.9, 1.9]), "×1.9 "),
    "no_batch_norm": (_set(("runs", "fixup", "final_test_acc"), 0.9123), "Fixup 0.912"),
    "gradient_snr": (_set(("stage_log10_snr", "plain", "0"), [-2.0, 0.0, 0.0]),
                     "0.01 vs"),
    "loss_landscape": (_set(("top", "bn", "9", "trained"), 4321.0), answers.num(4321.0)),
}


@pytest.mark.parametrize("name", ANSWERING)
def test_answer_is_one_generated_sentence(name):
    """One line, ending in a period, at most 60 words; it quotes a number of the record, and
    changing that number in a copy of the data changes the sentence to quote the new one."""
    data, claims = committed(name)
    text = answer(name, data, claims)
    check_sentence(text)
    numbers = {answers.num(x) for x in _numbers((data, [c["measured"] for c in claims]))}
    assert any(n in text for n in numbers if len(n) > 1), text
    if name not in KEY_NUMBER:
        pytest.skip(f"no key number listed for {name} (add one to KEY_NUMBER)")
    mutate, shown = KEY_NUMBER[name]
    assert shown not in text
    mutate(data, claims)
    changed = answer(name, data, claims)
    check_sentence(changed)
    assert changed != text and shown in changed, changed


def _numbers(tree):
    """Every finite number in a JSON-like tree."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list | tuple):
        for x in tree:
            yield from _numbers(x)
    elif isinstance(tree, int | float) and not isinstance(tree, bool) and math.isfinite(tree):
        yield tree


@pytest.mark.parametrize("name", ANSWERING)
def test_a_claim_that_does_not_reproduce_is_named(name):
    data, claims = committed(name)
    for i, c in enumerate(claims):
        if c["id"] in STATED_IN_WORDS:
            continue
        failed = copy.deepcopy(claims)
        failed[i]["agrees"] = False
        text = answer(name, data, failed)
        check_sentence(text)
        assert f"`{c['id']}`" in text and "not reproduce" in text, text


@pytest.mark.parametrize("name", ANSWERING)
def test_missing_entries_never_raise(name):
    """A failed trial leaves entries out of the data and claims; the answer still comes."""
    data, claims = committed(name)
    check_sentence(answer(name, {}, []))
    for key in data:
        partial = {k: v for k, v in data.items() if k != key}
        check_sentence(answer(name, partial, claims))
    for i in range(len(claims)):
        check_sentence(answer(name, data, claims[:i] + claims[i + 1:]))


# ---------------------------------------------------------------------------- directions

def _swap(*path_pairs):
    def mutate(data, claims):
        for head, a, b in path_pairs:
            data[head][a], data[head][b] = data[head][b], data[head][a]
    return mutate


def _curve_ratio(residual, ratio):
    """Set the BN ReLU MLP curve's ‖∂s/∂h_0‖ / ‖∂s/∂h_L‖ to ``ratio``."""
    def mutate(data, claims):
        for c in data["depth"]["curves"]:
            if c["norm"] and c["activation"] == "relu" and c["residual"] == residual:
                c["grad_norm"] = [ratio, 1.0]
    return mutate


#: (experiment, mutation reversing a comparison, words before, words after)
FLIPS = [
    ("degradation", _swap(("final_train_loss", "plain", "resnet")),
     "Yes for plain nets, no for residual ones", "No for plain nets, yes for residual ones"),
    ("lesions", lambda d, c: d["nets"]["resnet"].update(mean_drop=30.0),
     "but barely hurts the ResNet", "It breaks both nets"),
    ("lesions", _swap(("nets", "plain", "resnet")),
     "It breaks the plain net but barely hurts the ResNet",
     "It barely hurts the plain net but breaks the ResNet"),
    ("norm_preservation", _swap(("mean_abs_log", "plain", "resnet")),
     "Only at initialisation", "Only after training"),
    ("vanishing_exploding", _curve_ratio(False, 1e-6),
     "they explode without skips", "they vanish without skips"),
    ("vanishing_exploding", _set(("conv", "plain", "ratios"), [2.0, 3.0]),
     "beyond He et al.'s 'healthy' 10×", "within He et al.'s 'healthy' 10×"),
    ("vanishing_exploding", _curve_ratio(True, 1e12), ", less with them", "not less with them"),
    ("shattered_gradients", _swap(("acf1", "feedforward_bn", "resnet_bn")),
     "Yes, with batch norm", "No: the resnet's shatters"),
    ("paths_trained", _set(("states", "trained", "veit_range"), [[10, 16]]),
     "Short ones", "Not only short ones"),
    ("paths_at_init", _set(("veit_centre",), [30.0, 31.0]),
     "Shorter paths than average", "No shorter paths than average"),
    ("orderings", _set(("per_order", "bn_after_add", "final_test_acc"), [0.5]),
     "Only slightly", "Yes, at 20 layers"),
    ("orderings", _set(("per_order", "full_preact", "final_test_acc"), [0.96]),
     "full pre-activation beats the original", "full pre-activation trails the original"),
    ("highway_vs_residual", _set(("gate",), [0.1] * 9), "The gates open", "The gates close"),
    ("highway_vs_residual", _set(("final_test_acc", "highway"), [0.9, 0.9]),
     "the net matches the ResNet", "the net does not match the ResNet"),
    ("shortcut_scaling", _set(("live_bn_rate", "0.5"), 0.8),
     "grows ×1.2 at λ = 0.5, where λ^L would shrink it", "shrinks ×0.8 at λ = 0.5."),
    ("jacobian_spectra", _set(("claims:residual_block_norm_preservation", "measured"), 1.5),
     "Yes: ", "Partly: "),
    ("init_schemes", _set(("stats", "skipinit", "variance_identity_error"), [0.0, 0.5, 0.0]),
     "By making every block the identity", "Not all of them do: Fixup and zero-init-residual"),
]


@pytest.mark.parametrize("name, mutate, before, after", FLIPS,
                         ids=[f"{f[0]}-{i}" for i, f in enumerate(FLIPS)])
def test_direction_words_follow_the_numbers(name, mutate, before, after):
    data, claims = committed(name)
    text = answer(name, data, claims)
    assert before in text and after not in text, text
    mutate(data, claims)
    flipped = answer(name, data, claims)
    check_sentence(flipped)
    assert after in flipped and before not in flipped, flipped


def test_failures_the_answer_states_in_words_are_stated():
    """The committed run's claims that fail and are not named by id are said in words."""
    for name, words in (("vanishing_exploding", "beyond He et al.'s 'healthy' 10×"),
                        ("shortcut_scaling", "where λ^L would shrink it")):
        data, claims = committed(name)
        assert any(c["agrees"] is False and c["id"] in STATED_IN_WORDS for c in claims)
        assert words in answer(name, data, claims)


def test_helpers_format_for_people():
    assert answers.num(1006673526.7) == "1.01e9" and answers.num(3.77e-16) == "3.77e-16"
    assert answers.num(0.0068003) == "0.0068" and answers.num(None) == "n/a"
    assert answers.num(math.nan) == "nan" and answers.pct(0.9526) == "95.3%"
    assert answers.signed(0.418) == "+0.418" and answers.signed(-7.52) == "−7.52"
    assert answers.mean([1.0, math.nan, 3.0]) == 2.0 and math.isnan(answers.mean(math.nan))
    assert answers.sentence("  yes: two\nlines .") == "Yes: two lines."


# ---------------------------------------------------------------------------- wiring

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run of the degradation experiment (a few seconds), copied by each test."""
    out = tmp_path_factory.mktemp("quick") / "out"
    demo.main(["--quick", "--only", "degradation", "--out", str(out)])
    return out


def _copy(quick_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quick_run, out)
    return out


def _read(out):
    return json.loads((out / "results.json").read_text())


def test_demo_writes_the_answer_to_results_and_report(quick_run):
    from miniresnet.experiments import degradation

    record = _read(quick_run)["experiments"]["degradation"]
    assert record["answer"] == degradation.answer(record["data"], record["claims"])
    check_sentence(record["answer"])
    assert f"**Answer.** {record['answer']}" in (quick_run / "REPORT.md").read_text()


def test_replot_recomputes_the_answer(quick_run, tmp_path):
    out = _copy(quick_run, tmp_path)
    results = _read(out)
    expected = results["experiments"]["degradation"].pop("answer")
    (out / "results.json").write_text(json.dumps(results))  # as written before answers
    (out / "REPORT.md").unlink()
    demo.main(["--replot", "--out", str(out)])
    assert _read(out)["experiments"]["degradation"]["answer"] == expected
    assert f"**Answer.** {expected}" in (out / "REPORT.md").read_text()


def test_a_failing_answer_is_recorded_and_keeps_claims_and_figures(quick_run, tmp_path,
                                                                   monkeypatch):
    from miniresnet.experiments import degradation

    before = _read(quick_run)["experiments"]["degradation"]
    for i, argv in enumerate((["--quick", "--only", "degradation"], ["--replot"])):
        out = _copy(quick_run, tmp_path / str(i))  # the trials are cached: nothing trains
        with monkeypatch.context() as m:
            m.setattr(degradation, "answer", lambda data, claims: 1 / 0)
            with pytest.raises(SystemExit) as e:
                demo.main([*argv, "--out", str(out)])
        assert e.value.code == 1
        record = _read(out)["experiments"]["degradation"]
        assert record["error"] == {"type": "ZeroDivisionError",
                                   "message": "answer: division by zero"}
        assert "answer" not in record
        assert record["claims"] == before["claims"] and record["figures"] == before["figures"]
        assert (out / record["figures"][0]).is_file()
        assert "**Answer.**" not in (out / "REPORT.md").read_text()
        demo.main(["--replot", "--out", str(out)])  # the answer fixed: --replot retries it
        record = _read(out)["experiments"]["degradation"]
        assert "error" not in record and record["answer"] == before["answer"]


def _fake_results(answer):
    exp = {"title": "Does it work?", "setup": "", "seconds": 1.0, "figures": ["fig.png"],
           "data": {}, "failed": [],
           "claims": [{"id": "works", "source": "Fake 2020", "claim": "it works",
                       "paper": None, "paper_status": "derived", "measured": 1.5, "n": 1,
                       "spread": 0.0, "rule": {"op": "gt", "value": 1.0}, "holds_at": "quick",
                       "agrees": True}]}
    if answer is not None:
        exp["answer"] = answer
    return {"version": 1, "seed": 0, "scale": "default", "provenance": {},
            "experiments": {"fake": exp}}


def test_readme_section_and_report_print_the_answer_under_the_question():
    said = "Yes: it works, measured 1.5."
    block = report.readme_section(_fake_results(said))
    question = block.index("**Does it work?** (`fake`)")
    assert question < block.index(f"**Answer.** {said}") < block.index("![fake](figures/fig.png)")
    text = report.render(_fake_results(said))
    assert (text.index("## Does it work?") < text.index(f"**Answer.** {said}")
            < text.index("![fig.png](fig.png)"))
    for old in (report.readme_section(_fake_results(None)), report.render(_fake_results(None))):
        assert "Answer" not in old  # results.json written before answers: nothing printed
