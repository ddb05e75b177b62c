import pytest

from tests.helpers import Served, free_port, start_serve, stop_processes


@pytest.fixture(scope="module")
def server(exported_repo, tmp_path_factory):
    """`captioner serve` over the exported repository with its gRPC, HTTP/REST and metrics ports,
    one process per test module (a module's attacks and counters stay its own)."""
    hp, mp = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    p, url = start_serve(exported_repo[0], log, "--http-port", str(hp), "--metrics-port", str(mp))
    yield Served(p, url, hp, mp, log)
    stop_processes(p)
