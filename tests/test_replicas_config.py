"""How `serve --replicas` sizes its Ray Serve deployments from the profile, without a cluster: the GPU
share and memory fraction per replica, the plan's VRAM budget for that share, autoscaling bounds,
and clear errors for impossible combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'edge-runtime[ray]')")

from edge_runtime.errors import EdgeRuntimeError  # noqa: E402
from edge_runtime.serving.replicas import build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def replica_deployment(app):
    ingress = app._bound_deployment
    assert ingress.name == "Ingress" and ingress.ray_actor_options == {"num_cpus": 0}
    return ingress.init_args[0]._bound_deployment


def test_a_gpu_share_caps_memory_and_plans_for_the_share():
    replica = replica_deployment(build_app({"profile": "8gb", "set": ["replicas.num_gpus=0.5"], "replicas": 2}))
    assert replica.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.5}
    model, profile, overrides, _, _, memory_fraction = replica.init_args
    assert memory_fraction == 0.5  # set_per_process_memory_fraction in the replica
    assert "memory.vram_gib=4.000" in overrides  # the 8 GB tier's budget, halved
    assert replica.num_replicas == 2 and replica._deployment_config.autoscaling_config is None


def test_an_explicit_memory_fraction_wins_and_threads_follow_the_cpu_share():
    replica = replica_deployment(build_app({"profile": "8gb", "replicas": 1, "set": [
        "replicas.num_gpus=0.5", "replicas.memory_fraction=0.4", "replicas.num_cpus=2", "runtime.threads=0"]}))
    _, _, overrides, _, _, memory_fraction = replica.init_args
    assert memory_fraction == 0.4 and "memory.vram_gib=3.200" in overrides
    assert "runtime.threads=2" in overrides  # not every core of the box, which other replicas share


def test_autoscaling_bounds():
    replica = replica_deployment(build_app({"profile": "cpu", "replicas": "2", "min_replicas": "1",
                                            "max_replicas": "4"}))  # `serve run k=v` passes strings
    scaling = replica._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (1, 2, 4)
    assert scaling.target_ongoing_requests == 2.0


@pytest.mark.parametrize("args,message", [
    ({"replicas": 5, "min_replicas": 1, "max_replicas": 4}, "--replicas 5 must lie within the autoscaling bounds 1..4"),
    ({"replica": 2}, "unknown build_app argument(s) replica; allowed: model, profile"),
    ({"routing": "random"}, "routing 'random': allowed: voice or default"),
    ({"set": ["replicas.min_replicas=3", "replicas.max_replicas=2"]}, "replicas.min_replicas (3) must be at most"),
])
def test_impossible_settings_are_named(args, message):
    with pytest.raises(EdgeRuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_app({"profile": "cpu", **args})


def test_the_serve_deploy_example_is_a_valid_config():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((ROOT / "examples" / "ray_serve.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "edge_runtime.serving.replicas:build_app"
    replica = replica_deployment(build_app({**app.args, "profile": "8gb"}))
    assert replica._deployment_config.autoscaling_config.max_replicas == 4
    assert replica.ray_actor_options["num_gpus"] == 0.5
