"""A small sales-report pipeline: the example the README and the tests run.

    GenerateSales(region) ──> RegionSummary(region) ──┐   (fan-out over REGIONS)
                                                       ├──> Report       (fan-in)
                          TopProducts ─────────────────┘
                            └─ yields ProductHistory(product) for the best
                               sellers it finds at run time (dynamic deps)

Everything is deterministic, so the outputs of ``luigi`` and ``luigi-celery``
can be compared byte for byte (stock Luigi ignores luigi-celery's rate limit
and retry options on GenerateSales).  Run it with either:

    luigi-celery run --module examples.sales Report --date 2026-11-01
    PYTHONPATH=. luigi --module examples.sales Report --date 2026-11-01 --local-scheduler --workers 4
"""

import csv
import datetime
import json
import random
from pathlib import Path

import luigi

REGIONS = ("north", "south", "east", "west")
PRODUCTS = ("anvil", "bolt", "cog", "drill", "easel", "funnel", "gear", "hinge")


class SalesTask(luigi.Task):
    date = luigi.DateParameter(default=datetime.date(2026, 11, 1))
    out = luigi.Parameter(default="out", significant=False, description="folder for all outputs")

    def path(self, *parts: str) -> str:
        return str(Path(self.out, self.date.isoformat(), *parts))


class GenerateSales(SalesTask):
    """One region's raw sales for the day, as CSV (a stand-in for an extract from an API)."""

    region = luigi.Parameter()

    # luigi-celery: at most 10 extracts start per second, across every worker and dispatcher,
    # counted together with any family that names the same key ...
    rate_limit = "10/s"
    rate_limit_key = "sales-api"
    # ... and a dropped connection is tried again, up to 3 times, after a backoff with jitter.
    max_retries = 3
    retry_backoff = 0.5
    retry_on = (ConnectionError, TimeoutError)

    def output(self):
        return luigi.LocalTarget(self.path("raw", f"{self.region}.csv"))

    def run(self):
        rng = random.Random(f"{self.region}-{self.date}")
        with self.output().open("w") as f:
            writer = csv.writer(f)
            writer.writerow(["order", "product", "quantity", "unit_price"])
            for order in range(200):
                product = rng.choice(PRODUCTS)
                writer.writerow([f"{self.region[0]}{order:04d}", product, rng.randint(1, 9), rng.randint(5, 120)])


class RegionSummary(SalesTask):
    """Revenue per product for one region."""

    region = luigi.Parameter()

    def requires(self):
        return GenerateSales(date=self.date, out=self.out, region=self.region)

    def output(self):
        return luigi.LocalTarget(self.path("summary", f"{self.region}.json"))

    def run(self):
        revenue: dict[str, int] = {}
        with self.input().open() as f:
            rows = list(csv.DictReader(f))
        for i, row in enumerate(rows, 1):
            revenue[row["product"]] = revenue.get(row["product"], 0) + int(row["quantity"]) * int(row["unit_price"])
            if i % 50 == 0:
                self.set_progress_percentage(round(100 * i / len(rows)))
        self.set_status_message(f"{len(rows)} orders summarised")
        with self.output().open("w") as f:
            json.dump({"region": self.region, "revenue": dict(sorted(revenue.items()))}, f, indent=2)


class ProductHistory(SalesTask):
    """Orders of one product across all regions (found by TopProducts at run time)."""

    product = luigi.Parameter()

    def requires(self):
        return [GenerateSales(date=self.date, out=self.out, region=r) for r in REGIONS]

    def output(self):
        return luigi.LocalTarget(self.path("products", f"{self.product}.csv"))

    def run(self):
        with self.output().open("w") as out:
            writer = csv.writer(out)
            writer.writerow(["region", "order", "quantity", "unit_price"])
            for region, target in zip(REGIONS, self.input(), strict=True):
                with target.open() as f:
                    for row in csv.DictReader(f):
                        if row["product"] == self.product:
                            writer.writerow([region, row["order"], row["quantity"], row["unit_price"]])


class TopProducts(SalesTask):
    """The three best sellers, with their order histories (a dynamic dependency)."""

    top = luigi.IntParameter(default=3)

    def requires(self):
        return [RegionSummary(date=self.date, out=self.out, region=r) for r in REGIONS]

    def output(self):
        return luigi.LocalTarget(self.path("top_products.json"))

    def run(self):
        totals: dict[str, int] = {}
        for target in self.input():
            with target.open() as f:
                for product, revenue in json.load(f)["revenue"].items():
                    totals[product] = totals.get(product, 0) + revenue
        best = sorted(totals, key=lambda p: (-totals[p], p))[: self.top]
        self.set_status_message(f"best sellers: {', '.join(best)}")
        histories = yield [ProductHistory(date=self.date, out=self.out, product=p) for p in best]
        orders = {}
        for product, target in zip(best, histories, strict=True):
            with target.open() as f:
                orders[product] = sum(1 for _ in f) - 1
        with self.output().open("w") as f:
            json.dump([{"product": p, "revenue": totals[p], "orders": orders[p]} for p in best], f, indent=2)


class Report(SalesTask):
    """The day's report: revenue per region and the best sellers."""

    def requires(self):
        return {
            "regions": [RegionSummary(date=self.date, out=self.out, region=r) for r in REGIONS],
            "top": TopProducts(date=self.date, out=self.out),
        }

    def output(self):
        return luigi.LocalTarget(self.path("report.txt"))

    def run(self):
        lines = [f"Sales report for {self.date}", ""]
        for target in self.input()["regions"]:
            with target.open() as f:
                summary = json.load(f)
            lines.append(f"{summary['region']:>6}: {sum(summary['revenue'].values()):>8}")
        with self.input()["top"].open() as f:
            lines += ["", "Best sellers:"] + [
                f"  {t['product']}: {t['revenue']} ({t['orders']} orders)" for t in json.load(f)
            ]
        with self.output().open("w") as f:
            f.write("\n".join(lines) + "\n")
