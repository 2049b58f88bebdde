"""The served model offline (no Ray): what a monitored replica takes from each forward pass."""

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from steward.evaluate.profile import embedding_tap, penultimate_layer
from steward.monitor.checks import live_state
from steward.monitor.reference import reference_dir, reference_for
from steward.serve.model import load_served_model, non_finite_row
from steward.serve.monitoring import OTHER_GROUP, RecordQueue
from steward.spec.monitor import BiasSpec, MonitorSpec
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


@pytest.mark.slow  # trains the quickstart CNN for an epoch
def test_inputs_that_overflow_the_model_are_found_and_group_values_are_bounded(tmp_path):
    spec, run_dir = trained_run(tmp_path, "quickstart.yaml", epochs=1)
    served = load_served_model(spec, run_dir)
    instances = validation_inputs(spec, 3)
    instances[1] = (np.asarray(instances[1]) * 0 + 3e38).tolist()  # finite in float32, far past the training range
    (output,) = served.run([served.prepare(instances)], embed=True)
    assert non_finite_row(output) == 1
    (clean,) = served.run([served.prepare(instances[:1] + instances[2:])], embed=True)
    assert non_finite_row(clean) is None

    # groups: the spec's attribute only, the first max_groups values (and the privileged one) kept, the rest pooled
    bias = BiasSpec(group="region", favourable="1", privileged="north", max_groups=3)
    bins = reference_for(run_dir).bins()
    queue = RecordQueue(served, bins, bias)
    regions = ["a", "b", "c", "north", "a", "d"]
    six = replace(
        clean, probabilities=np.repeat(clean.probabilities[:1], 6, 0), inputs=np.repeat(clean.inputs[:1], 6, 0)
    )
    queue.append(replace(six, embeddings=None), {"region": regions, "other": list("xxxxxx")}, list("012345"))
    state = live_state(bins)
    queue.count_into(state)
    assert {group for group, _ in state.predicted} == {"north", "a", "b", OTHER_GROUP}
    unbiased = RecordQueue(served, bins, None)
    unbiased.append(clean, {"": ["x", "y"], "region": ["a", "b"]}, ["p", "q"])
    state = live_state(bins)
    unbiased.count_into(state)
    assert {group for group, _ in state.predicted} == {None}
