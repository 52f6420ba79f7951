"""Moving a warehouse of the single-file layout (rows in DuckDB tables, schema 5 and below) into parts.

Run by migration 6 inside the first publish that meets such a file, on the copy being rewritten: each
retained run's recommendations (per domain) and profiles, and the catalogue, are written as parts of the
publish's attempt and registered; the migration then drops the tables, and the views take their names.
Runs whose rows retention had dropped stay as they were (history: runs and metrics only). If the publish
fails, the copy is dropped and the attempt's parts are deleted with it: the old file is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from bridgerec.runtime.logs import get_logger
from bridgerec.storage.warehouse.parts import PartInfo, PartTarget, record_parts


@dataclass
class MoveContext:
    """Where the moved rows go: the publish attempt's part target."""

    target: PartTarget

    def move_legacy_rows(self, con: duckdb.DuckDBPyConnection) -> None:
        runs = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT r.run_id FROM recommendations r JOIN runs USING (run_id) ORDER BY 1"
            ).fetchall()
        ]
        parts: list[PartInfo] = []
        for run_id in runs:
            target = self.target.for_run(run_id)
            for (domain,) in con.execute(
                "SELECT DISTINCT domain FROM recommendations WHERE run_id = ? ORDER BY 1", [run_id]
            ).fetchall():
                rows = con.sql(
                    "SELECT run_id, user_id, domain, rank, item_id, score FROM recommendations "
                    "WHERE run_id = ? AND domain = ? ORDER BY user_id, rank",
                    params=[run_id, domain],
                ).to_arrow_table()
                parts.append(target.write(rows, "recommendations", 0, domain))
                serving = con.sql(
                    "SELECT run_id, user_id, domain, list(item_id ORDER BY rank) AS item_ids, "
                    "list(score ORDER BY rank) AS scores FROM recommendations WHERE run_id = ? AND domain = ? "
                    "GROUP BY ALL ORDER BY user_id",
                    params=[run_id, domain],
                ).to_arrow_table()
                parts.append(target.write(serving, "serving", 0, domain))
            profiles = con.sql(
                "SELECT run_id, user_id, profile_text, cluster_summaries, llm_model FROM user_profiles "
                "WHERE run_id = ? ORDER BY user_id",
                params=[run_id],
            ).to_arrow_table()
            if profiles.num_rows:
                parts.append(target.write(profiles, "user_profiles", 0))
        newest = con.execute(
            "SELECT run_id FROM runs WHERE status = 'completed' AND kind = 'publish' ORDER BY seq DESC LIMIT 1"
        ).fetchall()
        if newest:
            items = con.sql(
                "SELECT item_id, domain, title, brand, categories, price, updated_run_id FROM items ORDER BY item_id"
            ).to_arrow_table()
            parts.append(self.target.for_run(newest[0][0]).write(items, "items", 0))
        record_parts(con, parts, self.target.write_id)
        by_run = {p.run_id for p in parts}
        for run_id in by_run:
            con.execute(
                "UPDATE runs SET write_id = ?, n_parts = (SELECT count(*) FROM parts WHERE run_id = ?), "
                "data_bytes = (SELECT sum(bytes) FROM parts WHERE run_id = ?) WHERE run_id = ?",
                [self.target.write_id, run_id, run_id, run_id],
            )
        if runs:  # a new warehouse has nothing to move: nothing to say
            get_logger().info(
                "warehouse: moved the rows of %d runs into %d Parquet parts (the single-file layout ends here)",
                len(runs),
                len(parts),
            )
