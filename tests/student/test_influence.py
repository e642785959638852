"""The last-layer influence approximation: sign convention, agreement with exact leave-one-out
retraining, a planted mislabelled example ranked last, and feature capture from a real student."""

import numpy as np
import pytest

from gold_ray.student.influence import influence_scores, output_layer_features, softmax, validation_gradient


def fit_softmax_regression(x, y, k, l2, iters=30):
    """Exact minimiser of mean CE + l2/2 ||[W|b]||^2, by Newton's method (the objective is convex)."""
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    d = xb.shape[1]
    theta = np.zeros((k, d))
    onehot = np.eye(k)[y]
    for _ in range(iters):
        p = softmax(xb @ theta.T)
        grad = (p - onehot).T @ xb / len(x) + l2 * theta
        a = np.einsum("na,ab->nab", p, np.eye(k)) - np.einsum("na,nb->nab", p, p)
        hess = np.einsum("nab,nc,nd->acbd", a, xb, xb).reshape(k * d, k * d) / len(x) + l2 * np.eye(k * d)
        theta -= np.linalg.solve(hess, grad.reshape(-1)).reshape(k, d)
    return theta[:, :-1], theta[:, -1]


def rce(x, y, w, b):
    p = softmax(x @ w.T + b)
    return float((-np.log(1e-4) * (1 - p[np.arange(len(y)), y])).mean())


@pytest.fixture
def blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[2.0, 0.0], [-2.0, 0.0]])
    y = np.repeat([0, 1], 20)
    x = centers[y] + rng.normal(scale=1.0, size=(40, 2))
    yv = np.repeat([0, 1], 30)
    xv = centers[yv] + rng.normal(scale=1.0, size=(60, 2))
    return x, y, xv, yv


def test_a_planted_mislabelled_example_is_ranked_most_harmful(blobs):
    x, y, xv, yv = blobs
    # Deep inside class 0's cloud, labelled 1: the textbook harmful training example.
    x = np.vstack([x, [[3.0, 0.2]]])
    y = np.append(y, 1)
    w, b = fit_softmax_regression(x, y, 2, l2=0.01)
    infl = influence_scores(x, y, w, b, xv, yv, damping=0.01)
    assert int(np.argmax(infl)) == len(x) - 1, "the planted example must rank last (most harmful)"
    assert infl[-1] > 0 and (infl < 0).sum() > len(x) // 2


def test_influence_predicts_exact_leave_one_out_retraining(blobs):
    x, y, xv, yv = blobs
    x = np.vstack([x, [[3.0, 0.2], [-2.5, 1.0]]])
    y = np.append(y, [1, 0])
    l2 = 0.05
    w, b = fit_softmax_regression(x, y, 2, l2)
    infl = influence_scores(x, y, w, b, xv, yv, damping=l2)
    base = rce(xv, yv, w, b)
    actual = []
    for j in range(len(x)):
        keep = np.arange(len(x)) != j
        wj, bj = fit_softmax_regression(x[keep], y[keep], 2, l2)
        actual.append(rce(xv, yv, wj, bj) - base)
    predicted = -infl / len(x)  # removing z changes the validation loss by about -infl(z) / n
    assert np.corrcoef(predicted, actual)[0, 1] > 0.95
    assert np.sign(predicted[-2:]).tolist() == np.sign(actual[-2:]).tolist()


def test_validation_gradient_matches_finite_differences(blobs):
    _, _, xv, yv = blobs
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(2, 2)), rng.normal(size=2)
    g = validation_gradient(xv, yv, w, b)
    eps = 1e-6
    w2 = w.copy()
    w2[1, 0] += eps
    assert g[1, 0] == pytest.approx((rce(xv, yv, w2, b) - rce(xv, yv, w, b)) / eps, rel=1e-4)


def test_damping_must_be_positive(blobs):
    x, y, xv, yv = blobs
    with pytest.raises(ValueError, match="damping"):
        influence_scores(x, y, np.zeros((2, 2)), np.zeros(2), xv, yv, damping=0.0)


def test_output_layer_features_reproduce_a_real_students_logits(tmp_path):
    from gold_ray.run.tasks import load_task
    from gold_ray.student.model import ClassifierStudent
    from gold_ray.testing import save_tiny_classifier

    task = load_task("ag_news")
    student = ClassifierStudent(task, save_tiny_classifier(tmp_path / "m"), device="cpu")
    records = [{"text": f"headline number {i} about markets"} for i in range(5)]
    feats, w, b = output_layer_features(student, records)
    assert feats.shape == (5, 32) and w.shape == (4, 32) and b.shape == (4,)
    np.testing.assert_allclose(feats @ w.T + b, student.logits(records), atol=1e-4)
