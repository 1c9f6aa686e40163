#!/usr/bin/env python3
"""Write Roost's Grafana dashboards (edge.json, nodes.json, site.json) from the panel lists
below: edit here, run `python3 dashboards/build.py`, commit both. Panel titles are stable:
operators, dashboards/README.md, deploy/OPERATIONS.md and tests look panels up by title.
tests/tests/metrics.rs checks that every metric a panel queries is one the binaries export
right after start."""

import json
import os

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE = "$__rate_interval"
HERE = os.path.dirname(os.path.abspath(__file__))


def target(expr, legend="", ref="A", fmt=None, instant=False):
    t = {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "editorMode": "code",
        "range": not instant,
        "instant": instant,
    }
    if fmt:
        t["format"] = fmt
    return t


def targets(queries, **kw):
    """queries: [(expr, legend)]"""
    return [target(e, l, chr(ord("A") + i), **kw) for i, (e, l) in enumerate(queries)]


def timeseries(title, description, queries, unit="short", stack=False):
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets(queries),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10 if stack else 0,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "showPoints": "never",
                    "spanNulls": False,
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title, description, expr, unit="short", thresholds=None):
    steps = [{"color": "green", "value": None}]
    for value, color in thresholds or []:
        steps.append({"color": color, "value": value})
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, instant=True)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
    }


def heatmap(title, description, expr):
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "{{le}}", fmt="heatmap")],
        "options": {
            "calculate": False,
            "yAxis": {"unit": "s"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
            "tooltip": {"show": True, "yHistogram": True},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
        },
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(panels):
    """Rows span the width; stats are 4 wide and 4 high; other panels 8 wide, 8 high."""
    x = y = 0
    line_h = 0
    out = []
    for i, p in enumerate(panels, start=1):
        p = dict(p, id=i)
        if p["type"] == "row":
            if x:
                y += line_h
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
            x, line_h = 0, 0
        else:
            w, h = (4, 4) if p["type"] == "stat" else (12, 8) if p["type"] == "heatmap" else (8, 8)
            if x + w > 24:
                x, y = 0, y + line_h
                line_h = 0
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            x += w
            line_h = max(line_h, h)
        out.append(p)
    return out


def instance_var(name, label, metric):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": f"label_values({metric}, instance)", "refId": name},
        "definition": f"label_values({metric}, instance)",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "sort": 1,
        "hide": 0,
    }


DATASOURCE_VAR = {
    "name": "DS_PROMETHEUS",
    "label": "Prometheus",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "hide": 0,
    "includeAll": False,
    "multi": False,
    "options": [],
    "refresh": 1,
}


def dashboard(uid, title, description, variables, panels):
    return {
        "title": title,
        "uid": uid,
        "description": description,
        "tags": ["roost"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "refresh": "30s",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [
            {"type": "dashboards", "tags": ["roost"], "asDropdown": True, "title": "Roost"}
        ],
        "annotations": {"list": []},
        "templating": {"list": [DATASOURCE_VAR] + variables},
        "panels": layout(panels),
    }


P = 'instance=~"$proxy"'
A = 'instance=~"$agent"'


def quantiles(metric, sel, by="", label=""):
    group = f"le{', ' + by if by else ''}"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
            f"p{int(q * 100)}{' ' + label if label else ''}",
        )
        for q in (0.5, 0.99)
    ]


EDGE = dashboard(
    "roost-edge",
    "Roost / Edge",
    "The proxies: requests by status and node, latency, failovers, refusals, the routing table and its etcd snapshot.",
    [instance_var("proxy", "Proxy", "roost_proxy_sites")],
    [
        row("Overview"),
        stat("Requests/s", "Requests the proxies answered, all classes.",
             f"sum(rate(roost_proxy_requests_total{{{P}}}[{RATE}]))", "reqps"),
        stat("5xx ratio", "Share of answers that were 5xx (the proxy's own and the agents').",
             f"sum(rate(roost_proxy_requests_total{{{P},class=\"5xx\"}}[{RATE}])) / clamp_min(sum(rate(roost_proxy_requests_total{{{P}}}[{RATE}])), 1e-9)",
             "percentunit", [(0.01, "orange"), (0.05, "red")]),
        stat("Live nodes (now)", "Nodes in the routing table of the proxy that sees fewest. 0 is the NoLiveNode alert.",
             f"min(roost_proxy_nodes{{{P}}})", "short", [(0, "red"), (1, "green")]),
        stat("Sites", "Valid sites in the routing table.", f"max(roost_proxy_sites{{{P}}})"),
        stat("Snapshot staleness (max)", "Longest time since etcd confirmed a proxy's snapshot. Over 30 s is the SnapshotStale alert.",
             f"max(roost_proxy_snapshot_staleness_seconds{{{P}}})", "s", [(10, "orange"), (30, "red")]),
        stat("Sites awaiting a response (now)", "Sites with a request at an agent and no answer yet: sites in cold start (or slow).",
             f"sum(roost_proxy_sites_awaiting_response{{{P}}})"),
        row("Traffic"),
        timeseries("Requests by status", "Answers per second by status class (\"none\": the client left before an answer).",
                   [(f"sum by (class) (rate(roost_proxy_requests_total{{{P}}}[{RATE}]))", "{{class}}")], "reqps", stack=True),
        timeseries("Requests by node", "Answers per second by the node that answered (\"none\": the proxy answered itself). A node that leaves loses its series.",
                   [(f"sum by (node) (rate(roost_proxy_requests_total{{{P}}}[{RATE}]))", "{{node}}")], "reqps", stack=True),
        timeseries("5xx by node", "5xx answers per second by node: a dying node shows here before its lease expires.",
                   [(f"sum by (node) (rate(roost_proxy_requests_total{{{P},class=\"5xx\"}}[{RATE}]))", "{{node}}")], "reqps"),
        timeseries("Request latency", "Time to answer at the edge, all classes.",
                   quantiles("roost_proxy_request_duration_seconds", P), "s"),
        timeseries("Upstream latency", "Request sent to an agent until its response header; includes cold starts.",
                   quantiles("roost_proxy_upstream_duration_seconds", P), "s"),
        timeseries("Requests in flight", "Requests being answered now, per proxy.",
                   [(f"roost_proxy_requests_in_flight{{{P}}}", "{{instance}}")]),
        row("Nodes and failover"),
        timeseries("Live nodes", "Nodes in each proxy's routing table (registered under a live etcd lease). Drops when a node's lease expires (lease TTL after it died) or it drains away; draining: nodes that take no new placements.",
                   [(f"roost_proxy_nodes{{{P}}}", "live {{instance}}"),
                    (f"roost_proxy_draining_nodes{{{P}}}", "draining {{instance}}")]),
        timeseries("Failovers/s", "Connections to a node that failed and were retried on the next node of the ranking. Non-zero while a dead node is still registered.",
                   [(f"sum(rate(roost_proxy_failovers_total{{{P}}}[{RATE}]))", "failovers")], "ops"),
        timeseries("Suspect nodes", "Nodes that refused a connection recently; proxies try them last.",
                   [(f"roost_proxy_suspect_nodes{{{P}}}", "{{instance}}")]),
        timeseries("Rejections by reason", "Requests the proxy answered itself: unknown_site is a 404, no_node a 503, the rest malformed or over-limit requests.",
                   [(f"sum by (reason) (rate(roost_proxy_rejected_total{{{P}}}[{RATE}])) > 0", "{{reason}}")], "reqps"),
        timeseries("Sites awaiting a response", "Per proxy: sites with a request sent to an agent and no response header yet.",
                   [(f"roost_proxy_sites_awaiting_response{{{P}}}", "{{instance}}")]),
        row("Routing table and etcd"),
        timeseries("Routing table size", "Sites, and host names (site names, aliases, wildcards), per proxy.",
                   [(f"roost_proxy_sites{{{P}}}", "sites {{instance}}"), (f"roost_proxy_hosts{{{P}}}", "hosts {{instance}}")]),
        timeseries("etcd revision", "The etcd revision each proxy routes by; proxies that lag behind the others stand out.",
                   [(f"roost_proxy_etcd_revision{{{P}}}", "{{instance}}")]),
        timeseries("Snapshot staleness", "Time since etcd last confirmed each proxy's snapshot. Requests are still served while it grows, but changes are not seen.",
                   [(f"roost_proxy_snapshot_staleness_seconds{{{P}}}", "{{instance}}")], "s"),
        timeseries("Invalid site records and certificates", "Records in etcd skipped for not validating; certificates refused; TLS handshakes for names without a certificate.",
                   [(f"sum(increase(roost_proxy_invalid_site_records_total{{{P}}}[{RATE}]))", "invalid site records"),
                    (f"sum(increase(roost_proxy_tls_invalid_certificates_total{{{P}}}[{RATE}]))", "invalid certificates"),
                    (f"sum(increase(roost_proxy_tls_no_certificate_handshakes_total{{{P}}}[{RATE}]))", "handshakes without certificate")]),
        timeseries("Draining proxies", "1 while a proxy drains after SIGTERM (an upgrade or a stop).",
                   [(f"roost_proxy_draining{{{P}}}", "{{instance}}")]),
    ],
)

NODES = dashboard(
    "roost-nodes",
    "Roost / Nodes",
    "The agents: workers by state, cold starts (with the zygote's share), stops, crashes, limits and capacity.",
    [instance_var("agent", "Node (agent)", "roost_agent_max_workers")],
    [
        row("Overview"),
        stat("Workers", "Worker processes on the selected nodes, any state.",
             f"sum(roost_agent_workers{{{A}}})"),
        stat("Capacity used", "The fullest node: worker slots held / max_workers. At 100% a cold start must evict an idle worker first.",
             f"max(roost_agent_capacity_used_ratio{{{A}}})", "percentunit", [(0.8, "orange"), (0.95, "red")]),
        stat("Cold start p99", "99th percentile of request accepted → first response byte of a new worker, over the selected nodes.",
             f"histogram_quantile(0.99, sum by (le) (rate(roost_agent_cold_start_duration_seconds_bucket{{{A}}}[$__range])))",
             "s", [(0.5, "orange"), (1, "red")]),
        stat("Crashes (range)", "Workers that exited without being asked to, over the dashboard's time range.",
             f"sum(increase(roost_agent_worker_crashes_total{{{A}}}[$__range]))", "short", [(1, "orange")]),
        stat("Memory-limit kills (range)", "Worker processes killed for their site's memory limit over the time range.",
             f"sum(increase(roost_agent_worker_memory_limit_kills_total{{{A}}}[$__range]))", "short", [(1, "orange")]),
        stat("Live nodes", "Nodes registered, as the proxies see them (the fewest any proxy sees).",
             "min(roost_proxy_nodes)", "short", [(0, "red"), (1, "green")]),
        row("Cold starts"),
        heatmap("Cold start duration", "Request accepted by the agent → first response byte of the new worker it started, all launchers.",
                f"sum by (le) (rate(roost_agent_cold_start_duration_seconds_bucket{{{A}}}[{RATE}]))"),
        timeseries("Cold start p50/p99 by launcher", "The same histogram by launcher: zygote (forked from a preloaded interpreter) or direct (fork + exec).",
                   quantiles("roost_agent_cold_start_duration_seconds", A, "launcher", "{{launcher}}"), "s"),
        timeseries("Spawn time by launcher (zygote's share)", "The launcher's part of a cold start: user lookup, cgroup, and the fork from the zygote (or the exec). The rest of a cold start is the app's own boot and first request.",
                   quantiles("roost_agent_worker_spawn_duration_seconds", A, "launcher", "{{launcher}}"), "s"),
        timeseries("Spawns by launcher", "Workers started per second, by launcher.",
                   [(f"sum by (launcher) (rate(roost_agent_worker_spawns_total{{{A}}}[{RATE}]))", "{{launcher}}")], "ops", stack=True),
        timeseries("Requests waiting for a cold start", "Requests per second that found their site's worker starting and waited for it.",
                   [(f"sum(rate(roost_agent_cold_start_waits_total{{{A}}}[{RATE}]))", "waits")], "reqps"),
        timeseries("Rejections while cold", "Requests refused because their site could not start: start queue full, node at capacity, crash-loop backoff, start failed.",
                   [(f"sum by (reason) (rate(roost_agent_rejected_total{{{A},reason=~\"start_queue_full|at_capacity|crash_loop|start_failed\"}}[{RATE}]))", "{{reason}}")], "reqps"),
        row("Worker lifecycle"),
        timeseries("Workers by state", "starting: not answered yet; ready; draining: asked to stop, finishing what it accepted.",
                   [(f"sum by (state) (roost_agent_workers{{{A}}})", "{{state}}")], stack=True),
        timeseries("Capacity used by node", "Worker slots held / max_workers, per node.",
                   [(f"roost_agent_capacity_used_ratio{{{A}}}", "{{instance}}")], "percentunit"),
        timeseries("Worker stops by reason", "idle: no request for the site's idle timeout; evicted: made room for another site; memory_limit, start_timeout, recycled (a request timed out), replaced (new spec), removed, shutdown.",
                   [(f"sum by (reason) (rate(roost_agent_worker_stops_total{{{A}}}[{RATE}])) > 0", "{{reason}}")], "ops"),
        timeseries("Crashes, memory-limit kills, start timeouts", "Failures per second over the selected nodes.",
                   [(f"sum(rate(roost_agent_worker_crashes_total{{{A}}}[{RATE}]))", "crashes"),
                    (f"sum(rate(roost_agent_worker_memory_limit_kills_total{{{A}}}[{RATE}]))", "memory-limit kills"),
                    (f"sum(rate(roost_agent_worker_start_timeouts_total{{{A}}}[{RATE}]))", "start timeouts")], "ops"),
        timeseries("Crashes by node", "Crashes per second, per node.",
                   [(f"sum by (instance) (rate(roost_agent_worker_crashes_total{{{A}}}[{RATE}]))", "{{instance}}")], "ops"),
        timeseries("Refused starts", "Starts refused by policy or set-up: a site user outside the allowed range, an interpreter not allowed, a changed spec whose worker failed, a worker without kernel limits.",
                   [(f"sum(increase(roost_agent_refused_site_users_total{{{A}}}[{RATE}]))", "site user refused"),
                    (f"sum(increase(roost_agent_refused_interpreters_total{{{A}}}[{RATE}]))", "interpreter refused"),
                    (f"sum(increase(roost_agent_spec_change_failures_total{{{A}}}[{RATE}]))", "spec change failed"),
                    (f"sum(increase(roost_agent_limit_failures_total{{{A}}}[{RATE}]))", "started without limits")]),
        row("Requests at the agents"),
        timeseries("Agent requests by status", "Answers per second at the agents, by status class.",
                   [(f"sum by (class) (rate(roost_agent_requests_total{{{A}}}[{RATE}]))", "{{class}}")], "reqps", stack=True),
        timeseries("Agent rejections by reason", "Requests an agent refused before any worker: forbidden (no proxy credential), unknown_site, shutting_down, and the cold-start refusals.",
                   [(f"sum by (reason) (rate(roost_agent_rejected_total{{{A}}}[{RATE}])) > 0", "{{reason}}")], "reqps"),
        timeseries("Busiest sites", "The ten sites with the most requests per second (sites with a worker only).",
                   [(f"topk(10, sum by (site) (rate(roost_agent_site_requests_total{{{A}}}[{RATE}])))", "{{site}}")], "reqps"),
        row("Control plane"),
        timeseries("Agent snapshot staleness", "Time since etcd last confirmed each agent's site snapshot.",
                   [(f"roost_agent_snapshot_staleness_seconds{{{A}}}", "{{instance}}")], "s"),
        timeseries("Agent etcd revision", "The etcd revision of each agent's site snapshot.",
                   [(f"roost_agent_etcd_revision{{{A}}}", "{{instance}}")]),
        timeseries("Lease losses", "Times a node lost its etcd lease and re-registered (its sites moved away meanwhile).",
                   [(f"sum by (instance) (increase(roost_agent_lease_losses_total{{{A}}}[{RATE}]))", "{{instance}}")]),
        timeseries("Sites known", "Valid sites in each agent's snapshot.",
                   [(f"roost_agent_sites{{{A}}}", "{{instance}}")]),
    ],
)

SITE_SEL = 'site=~"$site"'
SITE = dashboard(
    "roost-site",
    "Roost / Site",
    "One site while it has a worker: requests, latency, memory against its limit, CPU. Per-site series exist only on the node running the site's worker, and only while it runs.",
    [
        {
            "name": "site",
            "label": "Site",
            "type": "query",
            "datasource": DS,
            "query": {"query": "label_values(roost_agent_site_requests_total, site)", "refId": "site"},
            "definition": "label_values(roost_agent_site_requests_total, site)",
            "refresh": 2,
            "includeAll": False,
            "multi": False,
            "current": {},
            "options": [],
            "sort": 1,
            "hide": 0,
        }
    ],
    [
        row("$site"),
        stat("Site requests/s", "Requests answered by the site's worker.",
             f"sum(rate(roost_agent_site_requests_total{{{SITE_SEL}}}[{RATE}]))", "reqps"),
        stat("Site p99 latency", "99th percentile time to answer at the agent.",
             f"histogram_quantile(0.99, sum by (le) (rate(roost_agent_site_request_duration_seconds_bucket{{{SITE_SEL}}}[{RATE}])))", "s"),
        stat("Site memory", "Memory charged to the site's cgroup.",
             f"sum(roost_agent_site_memory_bytes{{{SITE_SEL}}})", "bytes"),
        stat("Site memory / limit", "Memory over the site's limit; at 100% the kernel kills a worker process.",
             f"max(roost_agent_site_memory_bytes{{{SITE_SEL}}} / roost_agent_site_memory_limit_bytes{{{SITE_SEL}}})",
             "percentunit", [(0.8, "orange"), (0.95, "red")]),
        stat("Site CPU (cores)", "CPU cores the site's workers use.",
             f"sum(rate(roost_agent_site_cpu_seconds_total{{{SITE_SEL}}}[{RATE}]))", "short"),
        stat("Site in flight", "Requests in flight now.",
             f"sum(roost_agent_site_requests_in_flight{{{SITE_SEL}}})"),
        timeseries("Site requests", "Requests per second answered by the site's worker, per node running it.",
                   [(f"sum by (instance) (rate(roost_agent_site_requests_total{{{SITE_SEL}}}[{RATE}]))", "{{instance}}")], "reqps"),
        timeseries("Site latency", "Time to answer at the agent.",
                   quantiles("roost_agent_site_request_duration_seconds", SITE_SEL), "s"),
        timeseries("Site memory and limit", "Memory charged to the site's cgroup, and its limit.",
                   [(f"roost_agent_site_memory_bytes{{{SITE_SEL}}}", "used {{instance}}"),
                    (f"roost_agent_site_memory_limit_bytes{{{SITE_SEL}}}", "limit {{instance}}")], "bytes"),
        timeseries("Site CPU", "CPU seconds per second used by the site's workers.",
                   [(f"rate(roost_agent_site_cpu_seconds_total{{{SITE_SEL}}}[{RATE}])", "{{instance}}")], "short"),
        timeseries("Site requests in flight", "Requests in flight per node running the site.",
                   [(f"roost_agent_site_requests_in_flight{{{SITE_SEL}}}", "{{instance}}")]),
    ],
)

for name, board in (("edge", EDGE), ("nodes", NODES), ("site", SITE)):
    with open(os.path.join(HERE, f"{name}.json"), "w") as f:
        json.dump(board, f, indent=2)
        f.write("\n")
