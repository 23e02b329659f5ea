"""nbval: never compare stderr (tqdm, HF and torch warnings are the usual flakes)."""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "application/javascript")
