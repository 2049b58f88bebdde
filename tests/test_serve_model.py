"""The served model offline (no Ray): what a monitored replica takes from each forward pass."""

import threading

import numpy as np
import pytest
import torch

from steward.evaluate.profile import embedding_tap, penultimate_layer
from steward.monitor.reference import reference_dir, reference_for
from steward.serve.model import load_served_model
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.serving import trained_run, validation_inputs


@pytest.mark.slow  # trains the quickstart CNN for an epoch
def test_embed_returns_each_requests_own_embeddings_and_inputs_per_thread(tmp_path):
    spec, run_dir = trained_run(tmp_path, "quickstart.yaml", epochs=1)
    served = load_served_model(spec, run_dir)
    instances = validation_inputs(spec, 6)
    prepared = [served.prepare(instances[:2]), served.prepare(instances[2:3]), served.prepare(instances[3:])]
    layer = dict(served.model.named_modules())[penultimate_layer(served.model)]
    with torch.inference_mode(), embedding_tap(layer) as seen:  # the tap training's reference capture uses
        served.model(torch.cat(prepared), None)
    expected = torch.cat(seen).numpy()

    outputs = served.run(prepared, embed=True)
    assert [len(o.embeddings) for o in outputs] == [2, 1, 3]
    assert np.array_equal(np.concatenate([o.embeddings for o in outputs]), expected)
    assert np.array_equal(np.concatenate([o.inputs for o in outputs]), torch.cat(prepared).numpy())
    (alone,) = served.run([prepared[1]], embed=True)  # one request: one pass, no concatenation
    # another batch size may round differently in the convolutions: equal to float32 precision, not bit for bit
    np.testing.assert_allclose(alone.embeddings, expected[2:3], rtol=1e-5, atol=1e-5)
    (plain,) = served.run([prepared[1]])
    assert plain.embeddings is None and plain.inputs is None
    assert np.array_equal(plain.probabilities, alone.probabilities)

    # the hook stays on the layer; a pass in another thread (e.g. /explain) must not land in this thread's list
    tap = served.embedding_tap()
    tap.start()
    other = threading.Thread(target=lambda: served.run([prepared[2]], embed=True))
    other.start()
    other.join()
    with torch.inference_mode():
        served.model(prepared[0], None)
    mine = tap.stop()
    assert len(mine) == 1
    np.testing.assert_allclose(mine[0].numpy(), expected[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # trains the quickstart CNN for an epoch
def test_a_monitored_int8_model_is_profiled_as_it_is_served_once(tmp_path):
    """Loading a monitored int8 model saves its own reference beside training's fp32 one: its embeddings are the int8
    model's, the monitor takes it for int8 (training's for fp32), and a second load keeps the first profile."""
    spec, run_dir = trained_run(tmp_path, "quickstart.yaml", epochs=1)
    serve = ServeSpec(route_prefix="/digits", quantize="int8", quantize_tolerance=1.0)
    job = spec.model_copy(update={"serve": serve, "monitor": MonitorSpec.model_validate({"drift": {}})})
    served = load_served_model(job, run_dir)
    model_dir = run_dir / "model"
    assert reference_dir(run_dir, int8=True) == model_dir / "int8" and reference_dir(run_dir) == model_dir

    # every validation row in one batch, as the profile ran them: the same int8 pass (activations quantized per batch)
    (out,) = served.run([served.prepare(validation_inputs(spec, 10_000))], embed=True)
    int8, fp32 = reference_for(run_dir, int8=True).samples["embedding"], reference_for(run_dir).samples["embedding"]
    np.testing.assert_allclose(int8, out.embeddings, rtol=1e-5, atol=1e-5)
    assert np.abs(fp32 - out.embeddings).max() > 1e-3  # training's fp32 profile differs: int8 needs its own

    saved = (model_dir / "int8" / "reference.npz").stat().st_mtime_ns
    load_served_model(job, run_dir)
    assert (model_dir / "int8" / "reference.npz").stat().st_mtime_ns == saved
    assert not list(model_dir.glob(".int8-reference-*")), "a partial profile was left behind"
