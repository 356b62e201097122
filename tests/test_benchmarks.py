from __future__ import annotations

import json

from benchmarks import throughput


def test_throughput_smoke_writes_well_formed_json(tmp_path):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--smoke", "-o", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"device", "versions", "model", "batch", "rows"} <= set(result)
    rows = {(r["keep"], r["patch"]): r for r in result["rows"]}
    assert set(rows) == {(1.0, 4), (0.5, 4), (1.0, 8)}
    assert rows[(1.0, 4)]["speedup"] == 1.0 and rows[(1.0, 4)]["ideal"] == 1.0
    assert rows[(0.5, 4)]["tokens"] == 9 and rows[(1.0, 8)]["tokens"] == 5
    assert all(r["step_s"] > 0 and r["ideal"] >= 1.0 for r in rows.values())
