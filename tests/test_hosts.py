"""Other hosts, really: the controller and the API server in one network namespace and each worker in its
own, linked by veth pairs to a bridge on the first (as hosts on a private network are), every address
named. The namespaces are made and removed here, as root; the client runs inside the first one, so that no
traffic leaves the namespaces this test made."""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from helpers.runtime.loading import load_model
from helpers.serving.stack import Process

MODEL = "rwkv-4-world-tiny"
SUBNET = "10.213.7"  # a private network of this test's own: the hub is .1, the workers .2 and .3
CONTROLLER_PORT, API_PORT, WORKER_PORT = 21001, 8000, 21002


def ip(*arguments):
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    """{"hub": name, "w2": name, "w3": name}: three network namespaces on one bridge, removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = uuid.uuid4().hex[:6]
    names = {role: f"rwkv-{role}-{tag}" for role in ("hub", "w2", "w3")}
    made = []
    try:
        for name in names.values():
            ip("netns", "add", name)
            made.append(name)
        hub = names["hub"]
        ip("-n", hub, "link", "set", "lo", "up")
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        for host in (2, 3):
            worker = names[f"w{host}"]
            ip("-n", hub, "link", "add", f"to-w{host}", "type", "veth", "peer", "name", "eth0", "netns", worker)
            ip("-n", hub, "link", "set", f"to-w{host}", "master", "br0", "up")
            ip("-n", worker, "addr", "add", f"{SUBNET}.{host}/24", "dev", "eth0")
            ip("-n", worker, "link", "set", "eth0", "up")
            ip("-n", worker, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as error:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {error.stderr.strip()}")
    yield names
    for name in made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


CLIENT = """
import json, sys, time, requests
api, workers, count = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
deadline = time.monotonic() + 300
while True:  # both workers registered (first call) or the API server up (later calls)
    try:
        registered = requests.post(sys.argv[4] + "/worker_get_status", timeout=5).json()["speed"]
        if registered >= int(sys.argv[5]) and requests.get(api + "/health", timeout=5).ok:
            break
    except requests.RequestException:
        pass
    assert time.monotonic() < deadline, "the workers did not register"
    time.sleep(0.5)
def admitted():
    counts = []
    for worker in workers:
        try:
            counts.append(requests.post(worker + "/worker_get_status", timeout=5).json()["requests_admitted"])
        except requests.RequestException:
            counts.append(None)
    return counts
before = admitted()
texts = [requests.post(api + "/v1/completions", timeout=120, json={"model": "MODEL", "prompt": f"Question: {i}?\\n\\nAnswer:",
         "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"] for i in range(count)]
print(json.dumps({"texts": texts, "before": before, "after": admitted()}))
""".replace("MODEL", MODEL)


def test_workers_on_other_hosts_register_share_the_requests_and_one_takes_over(hosts, tiny_source):
    def on(role):
        return ["ip", "netns", "exec", hosts[role]]

    controller = Process("hosts-controller", "fastchat.serve.controller", port=CONTROLLER_PORT, host=f"{SUBNET}.1",
                         prefix=on("hub"))
    api_server = Process("hosts-api_server", "helpers.serving.api_server", ["--controller-address", controller.url],
                         port=API_PORT, prefix=on("hub"))  # on the hub's own loopback: the client runs there
    workers = [Process(f"hosts-worker-{host}", "helpers.serving.worker",
                       ["--controller-address", controller.url, "--model", tiny_source.location],
                       port=WORKER_PORT, host=f"{SUBNET}.{host}", prefix=on(f"w{host}")) for host in (2, 3)]
    processes = [controller, api_server, *workers]
    load_model(tiny_source)  # the low-bit cache, which both workers would otherwise build at once

    def client(count, registered):
        result = subprocess.run([*on("hub"), sys.executable, "-c", CLIENT, api_server.url, ",".join(w.url for w in workers),
                                 str(count), controller.url, str(registered)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    try:
        for process in processes:
            process.start()
        spread = client(8, registered=2)
        taken = [after - before for after, before in zip(spread["after"], spread["before"])]
        assert all(spread["texts"]) and sum(taken) == 8 and min(taken) > 0  # both hosts answered
        workers[0].popen.kill()
        workers[0].popen.wait()
        time.sleep(0.5)
        takeover = client(4, registered=1)
        assert takeover["texts"] == spread["texts"][:4]  # greedy: the same answers, all from the other host
        assert takeover["after"][0] is None and takeover["after"][1] - takeover["before"][1] == 4
    finally:
        for process in reversed(processes):
            process.stop()
