"""The CLI's tests reuse the clustering service's process fixtures."""

from tests.clustering_service.api.conftest import (  # noqa: F401
    clustering_factory,
    digits_vectors,
    embedded_data_dir,
    embedding_service,
    local_pg_server,
    service,
)
