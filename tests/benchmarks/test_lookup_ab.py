"""benchmarks/lookup_ab.py: (width, lookup nodes) configurations decoded interleaved, the
replay's accepted tokens a step beside the measured ones."""

import importlib.util
import os
import re

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "lookup_ab.py")
_spec = importlib.util.spec_from_file_location("lookup_ab", _PATH)
lookup_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lookup_ab)


def test_configurations_decode_interleaved_with_their_replay(smollm2_medusa_artifact, capsys):
    assert lookup_ab.main([str(smollm2_medusa_artifact), "--configs", "4:2,4:3,1:0",
                           "--new-tokens", "6", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [re.match(r"W=\s*(\d+) lookup\s+(\d+):\s+([\d.]+) tokens/s, ([\d.]+) accepted/step "
                     r"\(replayed ([\d.]+)\)", line) for line in out]
    assert [(int(r[1]), int(r[2])) for r in rows] == [(4, 2), (4, 3), (1, 0)]
    for r in rows:  # (on this CPU the draft proposes what calibration measured)
        assert float(r[3]) > 0 and r[4] == r[5], r[0]
    assert rows[2][4] == "1.000"
