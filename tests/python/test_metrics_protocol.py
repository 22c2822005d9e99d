"""`/metrics` as an inference gateway's endpoint picker reads it (the Gateway API Inference
Extension's model-server protocol; docs/INFERENCE_GATEWAY.md): the page parses as Prometheus
text and as OpenMetrics, and carries the protocol's gauges with their types and labels."""

import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as prometheus_families


def test_the_page_carries_the_model_server_protocol(server_url):
    page = urllib.request.urlopen(server_url + "/metrics").read().decode()
    for parse in (prometheus_families, openmetrics_families):
        families = {f.name: f for f in parse(page)}
        for name in ("mlxd_num_requests_waiting", "mlxd_num_requests_running", "mlxd_kv_cache_usage_ratio",
                     "mlxd_cache_config_info"):
            family = families[name]
            assert family.type == "gauge", (name, family.type)
            [sample] = family.samples
            assert sample.labels["model"] == "stories260k", sample
        usage = families["mlxd_kv_cache_usage_ratio"].samples[0].value
        assert 0.0 <= usage <= 1.0
        [info] = families["mlxd_cache_config_info"].samples
        assert info.value == 1 and int(info.labels["block_size"]) > 0 and int(info.labels["num_gpu_blocks"]) > 0
