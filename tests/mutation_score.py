"""The mutation score of the decision functions, from mutmut's results (``make mutate``).

mutmut mutates whole files; only these functions are decisions the fast
unit tests are meant to pin down. Mutants of the other functions in those
files have no fast test ("no tests") and are left to the e2e suite.

    python -m tests.mutation_score     # killed/total per function, then the survivors
"""

import subprocess
import sys
from collections import Counter

DECISIONS = {
    "orchestration.retry.x_retry_delay": "retry_delay",
    "orchestration.http_client.x_parse_reply": "parse_reply",
    "orchestration.http_client.x__success": "parse_reply: _success",
    "orchestration.http_client.x__error_detail": "parse_reply: _error_detail",
    "orchestration.http_client.x__retry_after": "parse_reply: _retry_after",
    "jobs.selectors.x_calls_in_flight": "calls_in_flight",
}


def main():
    listing = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    counts, survivors = Counter(), []
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        function = name.rsplit("__mutmut_", 1)[0]
        if function not in DECISIONS:
            continue
        counts[function, "total"] += 1
        counts[function, status] += 1
        if status != "killed":
            survivors.append(f"{status}: {name}")
    for function, label in DECISIONS.items():
        print(f"{label:32} {counts[function, 'killed']:3}/{counts[function, 'total']:<3} killed")
    print(f"{'all decision functions':32} {sum(counts[f, 'killed'] for f in DECISIONS):3}/"
          f"{sum(counts[f, 'total'] for f in DECISIONS):<3} killed")
    for survivor in survivors:
        print(survivor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
