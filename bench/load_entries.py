"""Writes N plan assignments (subjects k0.., plan `pro`) to a running sluice through
POST /v1/admin/entries, 1000 per call: bench/entries.sh and bench/entries-memory.sh.

Usage: python3 bench/load_entries.py PORT N TOKEN
"""
import json
import sys
import urllib.request

port, n, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for start in range(0, n, 1000):
    body = json.dumps([{"kind": "plan", "subject": f"k{i}", "plan": "pro"}
                       for i in range(start, min(n, start + 1000))]).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/admin/entries", body,
        {"content-type": "application/json", "authorization": f"Bearer {token}"})
    answer = json.load(urllib.request.urlopen(request))
    assert answer["written"] == min(1000, n - start), answer
