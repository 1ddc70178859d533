"""A task module the test workers do NOT allow (not in their --include list)."""

from tests.pipelines import OutTask


class Elsewhere(OutTask):
    def run(self):
        self.write()
