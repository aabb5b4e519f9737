"""The figures the golden and parity tests measured, as a markdown table: run the tests with
MINIMIND_JAX_TEST_FIGURES=FILE (tests/helpers.assert_within appends to it), then
`python tests/figures_table.py FILE`. A figure checked several times (xdist reruns, the same
label in a parametrized test) keeps its largest value."""

import json
import sys


def main(path: str) -> None:
    rows: dict[tuple[str, str], dict] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            key = (record["test"].removeprefix("tests/"), record["what"])
            if key not in rows or record["measured"] > rows[key]["measured"]:
                rows[key] = record
    print("| test | figure | measured | bound | bound / measured |")
    print("|---|---|---|---|---|")
    for (test, what), r in sorted(rows.items()):
        ratio = f"{r['bound'] / r['measured']:.1f}" if r["measured"] else "-"
        print(f"| {test} | {what} | {r['measured']:.3g} | {r['bound']:.3g} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
