"""The linear heads' paths: ridge's eigendecomposition and the warm-started L-BFGS of logreg and linear_svm minimise
scikit-learn's objectives (and LbfgsLinearSVC's), on numpy and on torch's CPU device, without copying the features."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.core.config import HeadParams
from pipeline.features.hdf5 import load_arrays
from pipeline.features.store import SPLIT_CODES
from pipeline.heads import linear
from pipeline.heads.estimators import LbfgsLinearSVC
from pipeline.heads.linear import (
    fit_logistic,
    nvidia_present,
    path_refit,
    path_sweep,
    predict_proba_rows,
    shared_preconditioner,
)
from pipeline.heads.linear_torch import TorchSolver
from pipeline.heads.objectives import Loss, Objective, Preconditioner, Stopping, minimise, preconditioned
from pipeline.heads.persistence import load_head, save_head
from pipeline.heads.registry import HEADS
from pipeline.heads.ridge import ridge_refit, ridge_sweep
from pipeline.heads.selection import held_out_proba, train_head
from tests.conftest import make_store


def overlapping(rows: int, dim: int = 24, n_classes: int = 5, seed: int = 0, dtype=np.float64) -> tuple:
    """Classes like a CNN's embeddings of a hard task: means at cosine ~0.8, told apart in a few correlated
    directions where the within-class spread exceeds the between-class one; offset and unequally scaled."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((6, dim))
    means = rng.standard_normal(dim) * 2.0 + rng.standard_normal((n_classes, 6)) @ basis
    y = rng.integers(0, n_classes, rows)
    y[: rows // 4] = 0  # unbalanced, so class weights matter
    x = means[y] + 1.6 * rng.standard_normal((rows, 6)) @ basis + rng.standard_normal((rows, dim))
    return (x * rng.uniform(0.5, 3.0, dim) + 5.0).astype(dtype), y


def probe_store(rows: int = 900, n_classes: int = 5, seed: int = 0):
    x, y = overlapping(rows, n_classes=n_classes, seed=seed, dtype=np.float32)
    split = np.tile([SPLIT_CODES["train"]] * 3 + [SPLIT_CODES["val"], SPLIT_CODES["test"]], rows // 5)
    return make_store(x, y, split, [f"c{k}" for k in range(n_classes)])


def theta(coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    return np.concatenate([np.atleast_2d(coef).ravel(), np.ravel(intercept)])


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ridge_from_one_eigendecomposition_is_scikit_learns_ridge_on_standardised_rows(n_classes, class_weight, dtype):
    x, y = overlapping(300, n_classes=n_classes, dtype=dtype)
    x_out, y_out = overlapping(100, n_classes=n_classes, seed=1, dtype=dtype)
    fixed = {} if class_weight is None else {"class_weight": class_weight}
    points = [{"alpha": a} for a in (0.01, 1.0, 100.0, 1e4)]
    swept = list(ridge_sweep(HEADS["ridge"], fixed, points, (x, y), (x_out, y_out), n_classes, "r"))
    z = StandardScaler().fit_transform(x.astype(np.float64))
    for (model, proba), point in zip(swept, points, strict=True):
        reference = RidgeClassifier(**point, class_weight=class_weight).fit(z, y)
        ours = model[-1].estimator_
        assert ours.coef_.shape == reference.coef_.shape and ours.intercept_.shape == reference.intercept_.shape
        scale = np.abs(reference.coef_).max()
        np.testing.assert_allclose(ours.coef_, reference.coef_, rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_allclose(ours.intercept_, reference.intercept_, rtol=1e-6, atol=1e-9)
        # The held-out probabilities are held_out_proba's: calibrated on those rows, through the pipeline.
        temperature = model[-1].temperature_
        np.testing.assert_allclose(proba, held_out_proba(model, x_out, y_out, n_classes), atol=1e-6)
        assert model[-1].temperature_ == pytest.approx(temperature, rel=1e-5)
    refit = ridge_refit(HEADS["ridge"], {**fixed, "alpha": 1.0}, (x, y), "r", temperature=2.5)
    np.testing.assert_allclose(refit[-1].estimator_.coef_, swept[1][0][-1].estimator_.coef_, rtol=1e-12)
    assert refit[-1].temperature_ == 2.5


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize(("class_weight", "dtype"), [(None, np.float32), ("balanced", np.float32), (None, np.float64)])
def test_the_logistic_path_minimises_scikit_learns_objective(n_classes, class_weight, dtype):
    x, y = overlapping(400, n_classes=n_classes, dtype=dtype)
    x_out, y_out = overlapping(200, n_classes=n_classes, seed=1, dtype=dtype)
    points = [{"C": c} for c in (0.001, 0.1, 10.0)]
    fixed = {"max_iter": 1000, "class_weight": class_weight}
    scaler = StandardScaler().fit(x.astype(np.float64))
    z, z_out = scaler.transform(x.astype(np.float64)), scaler.transform(x_out.astype(np.float64))
    for tol in (1e-4, 1e-8):  # the default, and tight enough for every solver to reach the same minimiser
        swept = list(path_sweep(HEADS["logreg"], {**fixed, "tol": tol}, points, (x, y), (x_out, y_out), n_classes, "l"))
        for (model, proba), point in zip(swept, points, strict=True):
            reference = LogisticRegression(**point, class_weight=class_weight, tol=tol, max_iter=1000).fit(z, y)
            solver = linear.LinearPath(model, (x, y), "cpu").solver
            others = [reference]  # scikit-learn's fit, and at the default tol ours from 0 (at 1e-8: the same)
            others += [fit_logistic(x, y, **point, class_weight=class_weight)[-1]] if tol == 1e-4 else []
            for other in others:
                expected = solver.value(theta(other.coef_, other.intercept_), point["C"])
                assert solver.value(theta(model[-1].coef_, model[-1].intercept_), point["C"]) == pytest.approx(
                    expected, rel=1e-4
                )
            assert model[-1].coef_.shape == reference.coef_.shape and model[-1].n_iter_.dtype == np.int32
            # At the default tol the solvers stop apart (2e-2 here at C = 10, scikit-learn from its own optimum
            # too). At 1e-8 they meet, but for float32 products at weak regularisation (C = 10 on 400 rows),
            # whose rounding moves the optimum of so flat an objective by 2e-3.
            if tol < 1e-4 and (dtype == np.float64 or point["C"] <= 0.1):
                np.testing.assert_allclose(proba, reference.predict_proba(z_out), atol=1e-3)
                np.testing.assert_allclose(proba, held_out_proba(model, x_out, y_out, n_classes), atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_the_squared_hinge_path_minimises_lbfgs_linear_svcs_objective(n_classes, class_weight):
    x, y = overlapping(600, n_classes=n_classes, dtype=np.float32)
    x_out, y_out = overlapping(200, n_classes=n_classes, seed=1, dtype=np.float32)
    points = [{"C": c} for c in (1e-5, 1e-3, 0.1)]
    fixed = {"class_weight": class_weight}
    swept = list(path_sweep(HEADS["linear_svm"], fixed, points, (x, y), (x_out, y_out), n_classes, "s"))
    z = StandardScaler().fit_transform(x)
    for (model, _), point in zip(swept, points, strict=True):
        cold = LbfgsLinearSVC(**point, class_weight=class_weight).fit(z, y)
        estimator = cold.set_params(tol=1e-4)
        objective = Objective(z, estimator.hinge_loss(y, cold.classes_, np.searchsorted(cold.classes_, y)))
        ours = model[-1].estimator_
        value = objective(theta(ours.coef_, ours.intercept_), point["C"])[0]
        assert value == pytest.approx(objective(theta(cold.coef_, cold.intercept_), point["C"])[0], rel=1e-4)
        assert ours.coef_.shape == cold.coef_.shape and isinstance(ours.n_iter_, int)
        np.testing.assert_array_equal(model[-1].classes_, cold.classes_)


@pytest.mark.parametrize("kind", ["logistic", "squared_hinge"])
def test_the_preconditioner_reaches_the_same_minimum_in_fewer_evaluations(kind):
    """On correlated features the change of variables cuts L-BFGS's evaluations; it stops on the gradient in W,
    as the plain minimisation does, so both meet the same tolerance at the same objective."""
    x, y = overlapping(1500, dim=64, n_classes=6)  # float64: float32 products round a gradient this small away
    x = x @ np.random.default_rng(1).uniform(0.0, 1.0, (64, 64))  # more correlated still
    scaler = StandardScaler().fit(x)
    loss = Loss(kind, y, 6, np.ones(6))
    objective = Objective(x, loss, scaler.mean_, scaler.scale_)
    C = 1.0 if kind == "logistic" else 0.01
    stopping = Stopping(gtol=1e-5 if kind == "logistic" else 1e-3, max_iter=5000, ftol=0.0)  # gtol alone stops
    with threadpool_limits(1):  # small products: more BLAS threads only wait for each other on a busy machine
        plain = minimise(objective, C, np.zeros(objective.size), stopping)
        preconditioned = minimise(objective, C, np.zeros(objective.size), stopping, Preconditioner(x, scaler.scale_))
    assert np.abs(objective(preconditioned.x, C)[1]).max() <= stopping.gtol
    assert preconditioned.fun == pytest.approx(plain.fun, rel=1e-5)
    assert preconditioned.nfev < plain.nfev / 2
    again = minimise(objective, C, preconditioned.x, stopping, Preconditioner(x, scaler.scale_))
    assert again.nit == 0 and again.x is preconditioned.x  # a start that meets the tolerance is the answer


def test_the_preconditioner_is_built_only_where_it_pays():
    """Rows x outputs below features^2 / 20 (the sample's 1,259 x 10 at 1,280 features), or rows below 8 x features
    (a few-shot draw of 16 images of 100 classes): the plain path, unchanged."""
    x, y = overlapping(600, dim=64, n_classes=3)
    few = Objective(x[:50], Loss("logistic", y[:50], 3, np.ones(3)))  # 50 x 3 x 20 < 64^2
    many = Objective(x, Loss("logistic", y, 3, np.ones(3)))  # 600 x 3 x 20 >= 64^2 and 600 >= 8 x 64
    x_wide, y_wide = overlapping(500, dim=64, n_classes=50)
    wide = Objective(x_wide, Loss("logistic", y_wide, 50, np.ones(50)))  # 500 x 50 x 20 >= 64^2, but 500 < 8 x 64
    assert preconditioned(few) is None and preconditioned(wide) is None
    assert isinstance(preconditioned(many), Preconditioner)


def test_one_preconditioner_serves_fits_on_subsets_of_its_rows():
    """The audit's folds: a preconditioner built on all the rows steers each fold's fit to that fold's minimum (the
    fit stops on its own gradient), the one its own preconditioner reaches; none where a fit would build none."""
    x, y = overlapping(3000, dim=64, n_classes=6)  # float64: float32 products round a gradient this small away
    rows = np.arange(0, 3000, 2)
    shared = shared_preconditioner(x, y[rows], rows)
    assert isinstance(shared, Preconditioner)
    assert shared_preconditioner(x, y[:40], np.arange(40)) is None
    fold = rows[: len(rows) * 4 // 5]
    own = fit_logistic(x, y[fold], 1.0, take=fold, tol=1e-6)
    steered = fit_logistic(x, y[fold], 1.0, take=fold, tol=1e-6, preconditioner=shared)
    np.testing.assert_allclose(steered.predict_proba(x), own.predict_proba(x), atol=1e-4)


def test_the_path_and_the_refit_warm_start_save_iterations():
    x, y = overlapping(1000, n_classes=4)
    x_train, y_train, x_val, y_val = x[:800], y[:800], x[800:], y[800:]
    points = [{"C": c} for c in (0.1, 1.0, 10.0)]
    swept = list(path_sweep(HEADS["logreg"], {"max_iter": 1000}, points, (x_train, y_train), (x_val, y_val), 4, "l"))
    cold = [fit_logistic(x_train, y_train, **p)[-1].n_iter_[0] for p in points]
    warm = [model[-1].n_iter_[0] for model, _ in swept]
    assert warm[0] == cold[0] and warm[1] < cold[1] and warm[2] < cold[2]
    started = path_refit(HEADS["logreg"], {"C": 10.0, "max_iter": 1000}, (x, y), "l", start=swept[2][0])
    assert started[-1].n_iter_[0] < fit_logistic(x, y, 10.0)[-1].n_iter_[0]


def test_fit_logistic_is_the_logreg_heads_pipeline():
    x, y = overlapping(300, n_classes=3)
    ours = fit_logistic(x, y, 0.5, tol=1e-8)
    reference = HEADS["logreg"].build({"C": 0.5, "tol": 1e-8}).fit(x, y)
    assert [name for name, _ in ours.steps] == [name for name, _ in reference.steps]
    for attr in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(getattr(ours[0], attr), getattr(reference[0], attr), rtol=1e-10)
    assert ours[0].n_samples_seen_ == reference[0].n_samples_seen_
    np.testing.assert_allclose(ours.predict_proba(x), reference.predict_proba(x), atol=1e-5)


def test_fit_logistic_on_some_rows_reads_them_where_they_lie_and_fits_what_a_copy_fits():
    x, y = overlapping(2000, n_classes=3, dtype=np.float32)
    take = np.sort(np.random.default_rng(0).choice(len(x), 1500, replace=False))
    ours = fit_logistic(x, y[take], 0.5, take=take)
    copied = fit_logistic(x[take], y[take], 0.5)
    np.testing.assert_allclose(ours[-1].coef_, copied[-1].coef_, rtol=1e-12)
    np.testing.assert_allclose(ours[0].scale_, copied[0].scale_, rtol=1e-12)
    held = np.setdiff1d(np.arange(len(x)), take)
    np.testing.assert_array_equal(predict_proba_rows(ours, x, held), ours.predict_proba(x[held]))


def overlapping_store_heads(kind: str, grid: dict, monkeypatch: pytest.MonkeyPatch | None = None):
    store = probe_store()
    params = HeadParams(kind=kind, grid=grid, selection="val")
    if monkeypatch is not None:  # the grid fitted point by point, as before the paths
        monkeypatch.setitem(HEADS, kind, dataclasses.replace(HEADS[kind], sweep=None, refit=None))
    head = train_head(store, kind, params)
    x_test, y_test = store.subset("test")
    return head, float((head.predict_proba(x_test).argmax(1) == y_test).mean())


@pytest.mark.parametrize(
    ("kind", "grid"),
    [
        ("logreg", {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}),
        ("ridge", {"alpha": [0.1, 10.0, 1000.0, 1e5]}),
        ("linear_svm", {"C": [1e-6, 1e-4, 1e-2, 1.0]}),
    ],
)
def test_a_path_chooses_the_point_and_scores_the_accuracy_that_point_by_point_fits_do(kind, grid, monkeypatch):
    path_head, path_accuracy = overlapping_store_heads(kind, grid)
    plain_head, plain_accuracy = overlapping_store_heads(kind, grid, monkeypatch)
    assert 0.5 < plain_accuracy < 0.95  # a probe that gets some wrong, so that C matters
    chosen = {key: path_head.hyperparameters[key] for key in grid}
    assert chosen == {key: plain_head.hyperparameters[key] for key in grid}
    assert path_accuracy == pytest.approx(plain_accuracy, abs=1 / 180)  # at most one of the 180 test images
    for ours, before in zip(path_head.val_curve, plain_head.val_curve, strict=True):
        assert ours["val_accuracy"] == pytest.approx(before["val_accuracy"], abs=1 / 180)
        assert ours["val_log_loss"] == pytest.approx(before["val_log_loss"], rel=0.02)


@pytest.fixture
def one_torch_thread():
    """torch's CPU solver runs many small ops: with a thread per core, on a busy machine each waits for the
    slowest thread (tests/conftest.py says more); one thread keeps them fast, as under pytest-xdist."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["logreg", "linear_svm"])
def test_the_torch_solver_on_the_cpu_fits_what_numpy_and_scikit_learn_fit(kind, monkeypatch, one_torch_thread):
    numpy_head, numpy_accuracy = overlapping_store_heads(kind, {"C": [1e-4, 1e-2, 1.0]})
    monkeypatch.setattr(
        linear, "make_solver", lambda device, x, loss, mean, scale, *_: TorchSolver("cpu", x, loss, mean, scale)
    )
    torch_head, torch_accuracy = overlapping_store_heads(kind, {"C": [1e-4, 1e-2, 1.0]})
    assert torch_head.hyperparameters == numpy_head.hyperparameters and torch_accuracy == numpy_accuracy
    x_test, _ = probe_store().subset("test")
    np.testing.assert_allclose(torch_head.predict_proba(x_test), numpy_head.predict_proba(x_test), atol=1e-3)
    for ours, before in zip(torch_head.val_curve, numpy_head.val_curve, strict=True):
        assert ours["val_accuracy"] == pytest.approx(before["val_accuracy"], abs=1 / 180)
    if kind == "logreg":  # and scikit-learn's own fit of the chosen C on train+val
        x_fit, y_fit = probe_store().subset("train", "val")
        reference = HEADS["logreg"].build(torch_head.hyperparameters).fit(x_fit, y_fit)
        np.testing.assert_allclose(torch_head.predict_proba(x_test), reference.predict_proba(x_test), atol=1e-3)


def test_the_torch_objective_is_the_numpy_objective(one_torch_thread):
    x, y = overlapping(300, n_classes=4, dtype=np.float32)
    rng = np.random.default_rng(0)
    losses = [Loss("logistic", y, 4, np.array([1.0, 2.0, 0.5, 1.0])), Loss("squared_hinge", y, 4, np.ones(4), 2.0)]
    losses += [Loss("logistic", y % 2, 2, np.ones(2)), Loss("squared_hinge", y % 2, 2, np.array([1.0, 3.0]))]
    for loss in losses:
        mean, scale = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
        numpy_objective, torch_solver = Objective(x, loss, mean, scale), TorchSolver("cpu", x, loss, mean, scale)
        point = rng.normal(size=numpy_objective.size) * 0.1
        value, grad = numpy_objective(point, 0.3)
        torch_value, torch_grad = torch_solver.value_and_grad(torch_solver.mean.new_tensor(point), 0.3)
        assert float(torch_value) == pytest.approx(value, rel=1e-6)
        np.testing.assert_allclose(torch_grad.numpy(), grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


@pytest.mark.skipif(nvidia_present(), reason="this machine has an NVIDIA GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error_naming_the_key():
    from pipeline.core.device import DeviceError

    message = r"^heads\.h\.device is cuda but no CUDA device is available; use auto or cpu$"
    with pytest.raises(DeviceError, match=message):
        train_head(probe_store(), "h", HeadParams(kind="logreg", grid={"C": [1.0]}, device="cuda"))


def test_device_auto_takes_the_cpu_below_the_work_worth_a_gpu_or_without_one():
    assert linear.solver_device("cpu", "heads.h.device", 10**12) == "cpu"
    assert linear.solver_device("auto", "heads.h.device", linear.WORTH_A_GPU - 1) == "cpu"
    if not nvidia_present():
        assert linear.solver_device("auto", "heads.h.device", 10**12) == "cpu"


@pytest.mark.parametrize(("kind", "grid"), [("logreg", {"C": [0.1, 1.0]}), ("ridge", {"alpha": [1.0, 10.0]})])
def test_arguments_the_paths_do_not_solve_are_fitted_point_by_point(kind, grid, monkeypatch):
    args = {"solver": "newton-cg"} if kind == "logreg" else {"solver": "lsqr"}
    store = probe_store()
    head = train_head(store, kind, HeadParams(kind=kind, args=args, grid=grid, selection="val"))
    monkeypatch.setitem(HEADS, kind, dataclasses.replace(HEADS[kind], sweep=None, refit=None))
    plain = train_head(store, kind, HeadParams(kind=kind, args=args, grid=grid, selection="val"))
    assert head.val_curve == plain.val_curve
    np.testing.assert_array_equal(head.predict_proba(store.features), plain.predict_proba(store.features))


@pytest.mark.parametrize("kind", ["logreg", "ridge", "linear_svm"])
def test_the_paths_never_copy_the_features(kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120_000, 32), dtype=np.float32) + np.repeat(np.eye(3, 32, dtype=np.float32), 40_000, 0)
    y = np.repeat(np.arange(3), 40_000)
    grid = {"logreg": [{"C": 1e-3}, {"C": 1e-2}], "ridge": [{"alpha": 1.0}], "linear_svm": [{"C": 1e-6}, {"C": 1e-5}]}
    sweep = ridge_sweep if kind == "ridge" else path_sweep
    tracemalloc.start()
    try:
        fitted = list(sweep(HEADS[kind], {}, grid[kind], (x, y), (x[:100], y[:100]), 3, "h"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(fitted) == len(grid[kind])
    # Blocks of rows and the labels' sorting, never a copy of the 15 MB of features (let alone a float64 one).
    assert peak < 0.75 * x.nbytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["logreg", "linear_svm"])
def test_on_cuda_a_head_is_the_cpu_head_in_the_same_file_format(kind, tmp_path):
    store, grid = probe_store(), {"C": [1e-4, 1e-2, 1.0]}
    cpu = train_head(store, kind, HeadParams(kind=kind, grid=grid, selection="val", device="cpu"))
    cuda = train_head(store, kind, HeadParams(kind=kind, grid=grid, selection="val", device="cuda"))
    assert cuda.hyperparameters == cpu.hyperparameters
    save_head(cuda, tmp_path / "cuda.h5")
    save_head(cpu, tmp_path / "cpu.h5")
    assert sorted(load_arrays(tmp_path / "cuda.h5")[0]) == sorted(load_arrays(tmp_path / "cpu.h5")[0])
    x_test, _ = store.subset("test")
    loaded = load_head(tmp_path / "cuda.h5", store)
    np.testing.assert_allclose(loaded.predict_proba(x_test), cpu.predict_proba(x_test), atol=1e-3)
