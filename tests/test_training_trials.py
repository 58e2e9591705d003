"""Shared trained networks (experiments.training): trained once and then loaded (in-process and
from a worker process), resumed after a kill exactly as an uninterrupted run, keyed by config
and seed, and uncached without a store."""

import json

import numpy as np
import pytest

from miniresnet import train
from miniresnet.creation import to_numpy
from miniresnet.experiments import runner, training

pytestmark = pytest.mark.backends("numpy")


CFG = training.config(1, residual=True, width=0.25, epochs=3)


def _state(model):
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.history == b.history and a.steps == b.steps
    sa, sb = _state(a.model), _state(b.model)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k


def test_trained_once_then_loaded(tmp_path, fits):
    with training.store_at(tmp_path):
        first = training.trained(CFG, 5)
        second = training.trained(json.loads(json.dumps(CFG)), 5)
    assert fits == [0]
    assert not first.cached and second.cached
    _same(first, second)
    assert len(first.history) == CFG["epochs"]
    assert second.model.config["n"] == 1 and not second.model.training
    key = training.train_key(CFG, 5)
    assert sorted(p.name for p in tmp_path.iterdir()
                  if not p.name.endswith(".lock") and ".epoch" not in p.name) == [
        f"{key}.json", f"{key}.safetensors"]  # the partial checkpoint is gone
    assert (tmp_path / f"{key}.epoch1.safetensors").exists()  # a snapshot kept on the way
    assert json.loads((tmp_path / f"{key}.json").read_text())["history"] == first.history


def test_another_seed_or_config_is_another_net(tmp_path, fits):
    other = training.config(1, residual=False, width=0.25, epochs=3)
    assert len({training.train_key(CFG, 5), training.train_key(CFG, 6),
                training.train_key(other, 5)}) == 3
    with training.store_at(tmp_path):
        a, b = training.trained(CFG, 5), training.trained(CFG, 6)
    assert fits == [0, 0]
    assert a.history != b.history


def test_without_a_store_nothing_is_cached(tmp_path, fits, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert training.current_store() is None
    training.trained(CFG, 5)
    training.trained(CFG, 5)
    assert fits == [0, 0]
    assert list(tmp_path.iterdir()) == []


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, fits):
    with training.store_at(tmp_path / "a"):
        whole = training.trained(CFG, 5)

    def kill_after_epoch_1(epoch):
        if epoch == 1:
            raise KeyboardInterrupt("killed")

    with training.store_at(tmp_path / "b"):
        with pytest.raises(KeyboardInterrupt):
            training.trained(CFG, 5, after_epoch=kill_after_epoch_1)
        key = training.train_key(CFG, 5)
        assert (tmp_path / "b" / f"{key}.partial.safetensors").exists()
        assert not (tmp_path / "b" / f"{key}.safetensors").exists()
        resumed = training.trained(CFG, 5)
    assert fits == [0, 0, 2]  # the resumed run trained only the last epoch
    assert not resumed.cached
    _same(whole, resumed)


def test_a_corrupt_checkpoint_is_retrained(tmp_path, fits):
    with training.store_at(tmp_path):
        first = training.trained(CFG, 5)
        path = tmp_path / f"{training.train_key(CFG, 5)}.safetensors"
        path.write_bytes(path.read_bytes()[:-10])
        again = training.trained(CFG, 5)
    assert fits == [0, 0]
    _same(first, again)


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="exactly the keys"):
        training.trained({**CFG, "extra": 1}, 0)
    with pytest.raises(ValueError, match="npz"):
        training.trained({**CFG, "data": "cifar"}, 0)


def test_the_runner_passes_the_store_to_worker_processes(tmp_path):
    from miniresnet.experiments import degradation

    configs = degradation.trials("quick", 0)[:1]
    trials = [runner.Trial("degradation", c, 1, "quick") for c in configs]
    store = tmp_path / ".trials" / runner.TRAINED
    with training.store_at(store):  # trained here, in this process
        training.trained(configs[0]["train"], configs[0]["train_seed"])
    [final] = [p for p in store.glob("*[0-9a-f].safetensors") if ".epoch" not in p.name]
    stamp = final.stat().st_mtime_ns
    with runner.executor(workers=2) as ex:
        outcome = runner.run_experiment("degradation", degradation, trials, tmp_path, ex,
                                        progress=False)
    assert outcome.computed == 1 and not outcome.failed
    assert final.stat().st_mtime_ns == stamp  # the worker loaded the net, it did not retrain
    assert sorted(p.name for p in store.glob("*.safetensors") if ".epoch" not in p.name) == [
        final.name]


def test_an_npz_file_sets_the_input_channels_and_classes_and_its_bytes_the_key(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.normal(size=(40, 3, 8, 8)), y=np.arange(40) % 4)
    cfg = training.config(1, width=0.25, epochs=1, data=str(path))
    with training.store_at(tmp_path / "store"):
        net = training.trained(cfg, 0)
        key = training.train_key(cfg, 0)
        np.savez(path, x=rng.normal(size=(40, 3, 8, 8)), y=np.arange(40) % 4)
        assert training.train_key(cfg, 0) != key  # new contents, new net
    assert (net.model.config["in_channels"], net.model.config["num_classes"]) == (3, 4)
    assert len(net.history) == 1


def test_steps_are_stored_and_a_divergence_reports_the_whole_run(tmp_path, monkeypatch):
    with training.store_at(tmp_path):
        net = training.trained(CFG, 5)
        steps_per_epoch = -(-1437 // CFG["batch_size"])  # the digits' training split
        assert len(net.steps["loss"]) == len(net.steps["grad_norm"]) == 3 * steps_per_epoch
        assert all(np.isfinite(net.steps["grad_norm"])) and min(net.steps["grad_norm"]) > 0
        cfg = training.config(1, residual=True, width=0.25, epochs=3, clip_norm=1.0)
        assert training.train_key(cfg, 5) != training.train_key(CFG, 5)

        def kill(epoch):
            raise KeyboardInterrupt("killed")

        with pytest.raises(KeyboardInterrupt):
            training.trained(cfg, 5, after_epoch=kill)  # epoch 0 done and checkpointed

        def diverge(*args, **kwargs):
            raise train.DivergenceError("diverged", 1, 2, float("nan"), train.History(
                step_loss=[0.5, 0.6, float("nan")], step_grad_norm=[1.0, 2.0, float("inf")]))

        monkeypatch.setattr(training, "fit", diverge)
        with pytest.raises(train.DivergenceError) as info:
            training.trained(cfg, 5)
    h = info.value.history
    assert len(h.records) == 1  # the stored epoch, then the failing one's steps
    assert len(h.step_loss) == steps_per_epoch + 3 and h.step_grad_norm[-1] == float("inf")
    assert all(np.isfinite(h.step_grad_norm[:steps_per_epoch]))


def test_a_training_experiment_on_a_dask_cluster_equals_in_process(tmp_path):
    """The training trials run on dask workers, which train and store the nets in the run's
    store; the numbers equal an in-process run's."""
    pytest.importorskip("distributed")
    from miniresnet.experiments import degradation

    configs = [c for c in degradation.trials("quick", 0) if c["n"] == 1]
    trials = [runner.Trial("degradation", c, 1, "quick") for c in configs]
    with runner.executor(workers=1) as ex:
        reference = runner.run_experiment("degradation", degradation, trials,
                                          tmp_path / "inproc", ex, progress=False)
    with runner.executor(workers=1, dask="local") as ex:
        assert ex.kind == "dask"
        on_dask = runner.run_experiment("degradation", degradation, trials, tmp_path / "dask",
                                        ex, progress=False)
    assert on_dask.computed == len(configs) and not on_dask.failed
    assert on_dask.results == reference.results
    stored = [p for p in (tmp_path / "dask" / ".trials" / runner.TRAINED).glob("*.safetensors")
              if ".epoch" not in p.name]
    assert len(stored) == len(configs)  # each net trained on the cluster and stored once


def test_same_seed_same_claims_and_data_from_scratch(tmp_path):
    """Two fresh quick runs of the training experiments (nothing cached, nets trained twice)
    give identical claims and data."""
    from miniresnet import demo

    names = ["degradation", "no_batch_norm", "gradient_snr", "norm_preservation"]
    runs = [demo.main(["--quick", "--only", *names, "--no-progress", "--out",
                       str(tmp_path / d)]) for d in "ab"]
    for name in names:
        a, b = (r["experiments"][name] for r in runs)
        assert "error" not in a and not a["failed"]
        assert a["claims"] == b["claims"] and a["data"] == b["data"], name
