"""The kubernetes work pool's base job template (containers/work-pools/kubernetes-gpu.json), checked against the
Kubernetes API schema.

For each kubernetes deployment in prefect.yaml the test renders the Job the way a prefect-kubernetes worker
does (KubernetesWorkerJobConfiguration: `from_template_and_values`, then `prepare_for_flow_run`) and validates
it with kubernetes-validate's bundled Kubernetes JSON schemas (offline) in strict mode, so a field that is
unknown where it stands, or of the wrong type, fails.

One exception, on purpose: Prefect's default Kubernetes template puts `parallelism: 1` and `completions: 1`
in the pod spec (`spec.template.spec`), where Kubernetes has no such fields, and the worker insists on them:
its `_validate_job_manifest` rejects a manifest without them ("Job is missing required attributes at the
following paths: ..."). The API server drops them with a warning (fieldValidation defaults to Warn for API
clients), so the test checks they are there, with value 1, and validates the rest of the Job strictly.
"""

from pathlib import Path
import copy
import json
import shlex
import sys

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  - sets the offline Prefect settings before Prefect is imported

# kubernetes-validate 1.37.0 bundles the schemas of Kubernetes 1.25 to 1.37; validate against the newest
K8S_VERSION = "1.37"
TEMPLATE = ROOT / "containers/work-pools/kubernetes-gpu.json"
K8S_POOL = "elborl-k8s-gpu"
FLOW_RUN = {"id": "0b5e6c1e-7d8a-4c1b-9a51-3f2f6f0d9a10", "name": "nimble-otter"}
# what prefect-kubernetes' _get_base_job_manifest requires of every job manifest (prefect_kubernetes/worker.py)
WORKER_REQUIRED = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"annotations": {}, "labels": {}},
                   "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                                  "containers": [{"name": "prefect-job"}]}}}}


def k8s_deployments() -> list[dict]:
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    return [d for d in deployments if d["work_pool"]["name"] == K8S_POOL]


def rendered_configuration(template: dict, job_variables: dict) -> dict:
    """from_template_and_values: the pool's job configuration with the variables' defaults overlaid by the
    deployment's job variables; a placeholder without a value drops its key."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(copy.deepcopy(template["job_configuration"]), {**defaults, **job_variables})


def worker_job(template: dict, job_variables: dict) -> dict:
    """The Job a kubernetes worker submits for a flow run: the rendered manifest plus what the worker's
    prepare_for_flow_run adds at run time (env as a list of {name, value}, labels, the command split into args,
    the default image when none is set, generateName from the flow run's name, the pod's labels)."""
    config = rendered_configuration(template, job_variables)
    job = config["job_manifest"]
    metadata, pod = job["metadata"], job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {"PREFECT_API_URL": "http://prefect-server.prefect.svc:4200/api", "PREFECT__FLOW_RUN_ID": FLOW_RUN["id"],
           # backoffLimit 0: the worker has the run rescheduled when its pod is evicted
           "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR":
               "reschedule" if job["spec"].get("backoffLimit") == 0 else "relinquish",
           **config.get("env", {})}
    container["env"] = [{"name": name, "value": str(value)} for name, value in env.items()]
    labels = {**metadata.get("labels", {}), **config.get("labels", {}),
              "prefect.io/flow-run-id": FLOW_RUN["id"], "prefect.io/flow-run-name": FLOW_RUN["name"],
              "app.kubernetes.io/managed-by": "prefect", "app.kubernetes.io/part-of": "prefect"}
    metadata["labels"] = labels
    metadata.setdefault("annotations", {})
    metadata.setdefault("namespace", config["namespace"])
    container.setdefault("image", "prefecthq/prefect:3-latest")
    args = container.get("args", "prefect flow-run execute")
    container["args"] = shlex.split(args) if isinstance(args, str) else args
    if metadata.get("generateName", "-") in ("-", "None-"):  # "{{ name }}-" renders to "-" without a name
        metadata["generateName"] = f"{FLOW_RUN['name']}-"
    pod.setdefault("metadata", {})["labels"] = labels
    return job


def without_worker_pod_fields(job: dict) -> dict:
    """The Job as the API server stores it: the pod spec without the worker's parallelism/completions."""
    job = copy.deepcopy(job)
    pod_spec = job["spec"]["template"]["spec"]
    assert (pod_spec.pop("parallelism"), pod_spec.pop("completions")) == (1, 1)
    return job


def validate(job: dict) -> str:
    import kubernetes_validate

    return kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("deployment", k8s_deployments(), ids=lambda d: d["name"])
def test_k8s_pool_job_of_each_deployment_is_a_valid_kubernetes_job(deployment):
    variables = deployment["work_pool"]["job_variables"]
    job = worker_job(json.loads(TEMPLATE.read_text()), variables)
    assert validate(without_worker_pod_fields(job)) == K8S_VERSION
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert (job["metadata"]["namespace"], container["image"], container["resources"]) == (
        variables["namespace"], variables["image"], variables["resources"])
    assert {"name": "AWS_ENDPOINT_URL", "value": variables["env"]["AWS_ENDPOINT_URL"]} in container["env"]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_k8s_deployments_exist():
    assert {d["name"] for d in k8s_deployments()} == {"campaign-nightly-k8s-gpu", "evaluate-k8s-gpu"}


def _pod_spec(job):
    return job["spec"]["template"]["spec"]


@pytest.mark.parametrize("break_it, error", [
    # the template as Prefect ships it, validated as is: the pod spec has no parallelism or completions
    (lambda job: _pod_spec(job).update(parallelism=1, completions=1),
     "Additional properties are not allowed ('completions', 'parallelism' were unexpected)"),
    # a Job field in the pod spec
    (lambda job: _pod_spec(job).update(backoffLimit=0), "'backoffLimit' was unexpected"),
    # a pod field in the Job spec
    (lambda job: job["spec"].update(restartPolicy="Never"), "'restartPolicy' was unexpected"),
    # the command as one string (the worker splits it into a list)
    (lambda job: _pod_spec(job)["containers"][0].update(args="prefect flow-run execute"),
     "'prefect flow-run execute' is not of type 'array'"),
    # env as a mapping (what the template renders before the worker turns it into a list)
    (lambda job: _pod_spec(job)["containers"][0].update(env={"AWS_ENDPOINT_URL": "https://s3.example.com"}),
     "is not of type 'array'"),
    (lambda job: job["spec"].update(backoffLimit="0"), "'0' is not of type 'integer'"),
], ids=["parallelism-in-pod-spec", "job-field-in-pod-spec", "pod-field-in-job-spec", "args-string", "env-mapping",
        "backoff-limit-string"])
def test_k8s_validation_rejects_misplaced_or_mistyped_fields(break_it, error):
    import kubernetes_validate

    job = without_worker_pod_fields(worker_job(json.loads(TEMPLATE.read_text()),
                                               k8s_deployments()[0]["work_pool"]["job_variables"]))
    validate(job)
    break_it(job)
    with pytest.raises(kubernetes_validate.ValidationError) as raised:
        validate(job)
    assert error in raised.value.message


@pytest.mark.parametrize("drop, missing", [
    (False, []),
    (True, ["/spec/template/spec/completions", "/spec/template/spec/parallelism"]),
], ids=["template", "without-pod-parallelism-completions"])
def test_k8s_template_has_what_the_kubernetes_worker_requires(drop, missing):
    """prefect-kubernetes' _validate_job_manifest: a JSON patch from the rendered manifest to WORKER_REQUIRED
    may not add anything (nor replace a value), else the worker fails the flow run."""
    from jsonpatch import JsonPatch

    template = json.loads(TEMPLATE.read_text())
    if drop:
        for key in ("parallelism", "completions"):
            del template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][key]
    for deployment in k8s_deployments():
        job = rendered_configuration(template, deployment["work_pool"]["job_variables"])["job_manifest"]
        for key in ("annotations", "labels"):  # the validator sets these when the template leaves them unset
            job["metadata"].setdefault(key, {})
        patch = list(JsonPatch.from_diff(job, WORKER_REQUIRED))
        assert sorted(op["path"] for op in patch if op["op"] == "add") == missing, deployment["name"]
        assert [op for op in patch if op["op"] == "replace"] == [], deployment["name"]
