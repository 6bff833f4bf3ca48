"""The scheduled backup (``backup.*``): a CronJob running ``engram backup --all`` into a volume
of the release or an S3-compatible bucket, reaching the shards as the operator does.

(``test_pods_run.py`` runs the job's pod against the pods it started.)
"""

from __future__ import annotations

from typing import Any

import pytest

S3 = {
    "enabled": True,
    "destination": "s3",
    "s3": {
        "bucket": "engram-backups",
        "prefix": "/prod/nightly/",
        "endpoint": "https://minio.storage:9000",
        "region": "eu-west-1",
        "existingSecret": "engram-s3",
    },
}


def _job(chart, docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the CronJob, its pod spec)."""
    cron = chart.one(docs, "CronJob", "backup")
    return cron, cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_off_by_default(chart) -> None:
    docs = chart.render({})
    assert not chart.find(docs, "CronJob") and not chart.find(docs, "PersistentVolumeClaim")


def test_to_a_volume_of_the_release(chart) -> None:
    docs = chart.render(
        {"backup": {"enabled": True, "schedule": "*/30 * * * *", "timeZone": "Etc/UTC"}}
    )
    cron, pod = _job(chart, docs)
    assert cron["spec"]["schedule"] == "*/30 * * * *"
    assert cron["spec"]["timeZone"] == "Etc/UTC"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:4] == ["engram", "backup", "--all", "--stamp"]
    assert args[args.index("--to") + 1] == "/backups"
    assert "--redis=$(ENGRAM_REDIS_URL)" in args and "--key-prefix=$(ENGRAM_KEY_PREFIX)" in args
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["backups"] == "/backups"
    claim = {v["name"]: v for v in pod["volumes"]}["backups"]["persistentVolumeClaim"]
    pvc = chart.one(docs, "PersistentVolumeClaim", "backup")
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env = chart.env_of(container)
    assert not {k for k in env if k.startswith("AWS_")}
    # Redis and the internal token exactly as the operator gets them
    operator = chart.one(docs, "Deployment", "operator")["spec"]["template"]["spec"]
    op_env = chart.env_of(operator["containers"][0])
    for name in ("REDIS_PASSWORD", "ENGRAM_REDIS_URL", "ENGRAM_KEY_PREFIX"):
        assert env[name] == op_env[name], name
    assert env["ENGRAM_INTERNAL_TOKEN_FILE"] == op_env["ENGRAM_INTERNAL_TOKEN_FILE"]
    token = {v["name"]: v for v in pod["volumes"]}["internal-token"]
    assert token == {v["name"]: v for v in operator["volumes"]}["internal-token"]


def test_to_an_s3_bucket_with_keys_from_a_secret(chart) -> None:
    docs = chart.render(
        {"backup": S3, "internalTls": {"enabled": True, "secretName": "engram-internal-tls"}}
    )
    assert not chart.find(docs, "PersistentVolumeClaim")
    _, pod = _job(chart, docs)
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--to") + 1] == "s3://engram-backups/prod/nightly"
    assert args[args.index("--s3-endpoint") + 1] == "https://minio.storage:9000"
    env = chart.env_of(container)
    assert env["AWS_REGION"] == "eu-west-1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"secretKeyRef": {"name": "engram-s3", "key": key}}
    assert env["ENGRAM_INTERNAL_TLS_CA"] == "/etc/engram/internal-tls/ca.crt"
    assert "backups" not in {m["name"] for m in container["volumeMounts"]}
    # without a Secret or an endpoint: the pod's identity, AWS S3
    bare = {"enabled": True, "destination": "s3", "s3": {"bucket": "b-1"}}
    _, pod = _job(chart, chart.render({"backup": bare}))
    (container,) = pod["containers"]
    assert "--s3-endpoint" not in container["args"]
    assert container["args"][container["args"].index("--to") + 1] == "s3://b-1/engram"
    assert not {k for k in chart.env_of(container) if k.startswith("AWS_")}


def test_the_job_may_reach_the_shards(chart) -> None:
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in chart.find(chart.render({"backup": {"enabled": True}}), "NetworkPolicy")
    }
    shard_from = [
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for peer in policies["shard"]["spec"]["ingress"][0]["from"]
    ]
    assert sorted(shard_from) == ["backup", "gateway", "operator", "shard"]


@pytest.mark.parametrize(
    ("backup", "named"),
    [
        ({"enabled": True, "destination": "s3"}, "/backup/s3/bucket"),
        ({"enabled": True, "destination": "tape"}, "/backup/destination"),
        ({"enabled": True, "s3": {"bucket": "Not_A_Bucket"}}, "/backup/s3/bucket"),
        ({"enabled": True, "pvc": {"size": "lots"}}, "/backup/pvc/size"),
        ({"enabled": True, "schedule": "daily"}, "/backup/schedule"),
    ],
)
def test_bad_backup_values_fail_naming_the_value(chart, backup: dict[str, Any], named: str):
    with pytest.raises(Exception, match=named):
        chart.render({"backup": backup})
