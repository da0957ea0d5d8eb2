"""Wire format of the clustering service (see docs/api.md in ../shared).

The service validates requests with these models and the client builds and
reads them. Names that may end up near a path or a URL (datasets, models,
aliases) are restricted to ``[A-Za-z0-9._-]`` starting with a letter or digit,
and so are the ids the service hands out (datasets, jobs); item ids may be any
printable text up to 512 characters (they are data, never part of a file name).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ITEM_ID_PATTERN = r"^[^\x00-\x1f\x7f]{1,512}$"
#: dataset and job ids as the service makes them (``ds_<hex>``, ``job_<hex>``)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

Name = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="1-128 characters: letters, digits, '.', '_', '-'; starts with a "
        "letter or digit.",
    ),
]
ItemId = Annotated[str, Field(pattern=ITEM_ID_PATTERN, description="1-512 printable characters.")]
ResourceId = Annotated[
    str, Field(pattern=ID_PATTERN, description="A dataset id as the service returned it.")
]
# PostgreSQL text cannot hold NUL: free text the service stores or looks up is refused
# with one (422 naming the field) instead of failing in the database.
NO_NUL_PATTERN = r"^[^\x00]*$"
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- datasets -----------------------------------------------------------------------


class DatasetCreate(_Request):
    name: Name


class Dataset(BaseModel):
    id: str
    name: str
    count: int = Field(description="Items stored now.")
    dim: int | None = Field(description="Vector dimension (set by the first item).")
    revision: int = Field(description="Grows with every change of the items.")
    created_at: datetime
    updated_at: datetime


class DatasetList(BaseModel):
    datasets: list[Dataset]


class ItemIn(_Request):
    """One item: exactly one of ``image`` and ``embedding``."""

    id: ItemId
    image: str | None = Field(
        None,
        description='Base64 image or "data:image/...;base64," URI (embedded by the '
        "embedding service).",
    )
    embedding: list[float] | str | None = Field(
        None,
        description="The vector as JSON numbers, or base64 of its little-endian float32 "
        "bytes (as the embedding service's encoding=base64).",
    )
    label: str | None = Field(
        None,
        max_length=512,
        pattern=NO_NUL_PATTERN,
        description="Known class, for evaluation metrics only.",
    )
    meta: dict[str, Any] | None = Field(None, description="Any JSON object, kept as is.")

    @model_validator(mode="after")
    def _one_source(self) -> ItemIn:
        if (self.image is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'image' and 'embedding'")
        return self


class ItemsAdd(_Request):
    items: list[ItemIn] = Field(min_length=1)


class ItemsAdded(BaseModel):
    added: int = Field(description="Items stored by this request.")
    duplicates: int = Field(description="Items whose id was already stored (left unchanged).")
    count: int = Field(description="Items in the dataset now.")
    dim: int


class Item(BaseModel):
    """``GET /v1/datasets/{dataset_id}/items/{item_id}``."""

    item_id: str
    label: str | None
    meta: dict[str, Any] | None
    created_at: datetime
    has_thumbnail: bool = Field(description="Items added as images have one.")


class ItemsDelete(_Request):
    ids: list[ItemId] = Field(min_length=1)


class ItemsLookup(_Request):
    ids: list[ItemId] = Field(min_length=1, max_length=100_000)


class ItemsFound(BaseModel):
    present: list[str] = Field(description="Ids the dataset holds, in request order.")
    missing: list[str] = Field(description="Ids it does not hold, in request order.")


class ItemsDeleted(BaseModel):
    deleted: int
    missing: int = Field(description="Ids that were not in the dataset.")
    count: int


class ThumbnailsLookup(_Request):
    ids: list[ItemId] = Field(min_length=1, max_length=500)


class ItemThumbnail(BaseModel):
    item_id: str
    thumbnail: str | None = Field(
        description='"data:image/webp;base64,..." or null (no such item, or added as a vector).'
    )


class Thumbnails(BaseModel):
    thumbnails: list[ItemThumbnail] = Field(description="In the order of the request's ids.")


# --- algorithms ---------------------------------------------------------------------


class Parameter(BaseModel):
    name: str
    schema_: dict[str, Any] = Field(alias="schema", description="JSON schema of the type.")
    default: Any
    description: str | None = None

    model_config = ConfigDict(populate_by_name=True)


class Algorithm(BaseModel):
    name: str
    description: str
    parameters: list[Parameter]
    update_parameters: list[Parameter]
    supports_auto_k: bool


class AlgorithmList(BaseModel):
    algorithms: list[Algorithm]


# --- jobs ---------------------------------------------------------------------------


class TrainJobCreate(_Request):
    type: Literal["train"]
    dataset_id: ResourceId
    algorithm: str
    model_name: Name
    n_clusters: int | None = Field(
        None, ge=2, le=100_000, description="Omit for an automatic choice of k."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    params: dict[str, Any] = Field(default_factory=dict)


class UpdateJobCreate(_Request):
    type: Literal["update"]
    model_name: Name
    from_version: int | None = Field(None, ge=1, description="Default: the latest version.")
    dataset_id: ResourceId | None = Field(
        None, description="Default: the parent version's dataset."
    )
    params: dict[str, Any] = Field(default_factory=dict)


JobCreate = Annotated[TrainJobCreate | UpdateJobCreate, Field(discriminator="type")]


class ModelUpdateCreate(_Request):
    """``POST /v1/models/{name}/update``: an update job on this model."""

    dataset_id: ResourceId | None = None
    from_version: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


class JobProgress(BaseModel):
    stage: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    label_change: float | None = None
    fraction: float | None = Field(None, description="Rough share of the job done, 0-1.")


class ErrorInfo(BaseModel):
    type: str
    message: str


class JobResult(BaseModel):
    model_name: str
    version: int


class Job(BaseModel):
    id: str
    type: Literal["train", "update"]
    state: JobState
    dataset_id: str | None
    model_name: str | None
    algorithm: str | None
    params: dict[str, Any]
    progress: JobProgress | None
    error: ErrorInfo | None
    result: JobResult | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    jobs: list[Job]


# --- models -------------------------------------------------------------------------


class Version(BaseModel):
    model_name: str
    version: int
    algorithm: str
    n_clusters: int
    dim: int
    params: dict[str, Any]
    seed: int | None = None
    dataset_id: str | None
    item_count: int
    parent_version: int | None
    job_id: str | None
    metrics: dict[str, Any]
    stability: dict[str, Any] | None = Field(None, description="Updates only.")
    k_selection: dict[str, Any] | None = Field(None, description="When k was chosen.")
    fit_seconds: float | None
    created_at: datetime


class AliasEvent(BaseModel):
    alias: str
    version: int
    previous_version: int | None
    changed_at: datetime


class ModelSummary(BaseModel):
    name: str
    latest_version: int
    aliases: dict[str, int]
    created_at: datetime


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    versions: list[Version]
    alias_history: list[AliasEvent]


class AliasSet(_Request):
    version: int = Field(ge=1)


class Alias(BaseModel):
    model_name: str
    alias: str
    version: int
    previous_version: int | None


class ClusterSummary(BaseModel):
    cluster: int
    size: int
    exemplars: list[str] = Field(description="Item ids closest to the cluster's mean.")


class Clusters(BaseModel):
    model_name: str
    version: int
    clusters: list[ClusterSummary]


class Assignment(BaseModel):
    item_id: str
    cluster: int
    probability: float


class Assignments(BaseModel):
    model_name: str
    version: int
    total: int = Field(description="Items matching the filter.")
    items: list[Assignment]
    next_cursor: str | None


class ProjectedItem(BaseModel):
    item_id: str
    cluster: int
    x: float
    y: float


class Projection(BaseModel):
    model_name: str
    version: int
    dataset_id: str | None
    method: Literal["pca"]
    seed: int = Field(description="Seed of the sample: the same request gives the same points.")
    total: int = Field(description="Items of the version.")
    missing: int = Field(
        description="Items of the version deleted from the dataset since (no vector to project)."
    )
    explained_variance_ratio: list[float] = Field(description="Share of variance per axis.")
    points: list[ProjectedItem]


class ClusterTransition(BaseModel):
    from_cluster: int
    to_cluster: int
    count: int


class MovedItem(BaseModel):
    item_id: str
    from_cluster: int
    to_cluster: int
    probability: float = Field(description="Of its new cluster.")


class Transitions(BaseModel):
    model_name: str
    version: int
    from_version: int
    is_parent: bool = Field(description="from_version is the version's parent.")
    items_shared: int = Field(description="Items in both versions.")
    items_added: int = Field(description="Items of version not in from_version.")
    items_removed: int = Field(description="Items of from_version not in version.")
    moved: int = Field(description="Shared items whose cluster id changed.")
    kept_fraction: float | None = Field(description="Shared items that kept their cluster id.")
    from_sizes: list[int] = Field(description="Cluster sizes in from_version, by cluster id.")
    to_sizes: list[int] = Field(description="Cluster sizes in version, by cluster id.")
    emptied_clusters: list[int] = Field(description="Had items in from_version, none now.")
    centroid_shift: list[float | None] | None = Field(
        description="Per cluster id, from the update's stability report (parent only)."
    )
    transitions: list[ClusterTransition] = Field(
        description="Shared items per (from cluster, to cluster) pair; pairs with none left out."
    )
    moved_items: list[MovedItem] = Field(description="A seeded sample of the moved items.")


# --- prediction ---------------------------------------------------------------------


class PredictRequest(_Request):
    images: list[str] | None = Field(None, min_length=1)
    embeddings: list[list[float]] | list[str] | None = Field(
        None, min_length=1, description="JSON numbers or base64 little-endian float32."
    )
    return_probabilities: bool = Field(False, description="Include every cluster's probability.")

    @model_validator(mode="after")
    def _one_source(self) -> PredictRequest:
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give exactly one of 'images' and 'embeddings'")
        return self


class Prediction(BaseModel):
    cluster: int
    probability: float
    probabilities: list[float] | None = None


class Predictions(BaseModel):
    model_name: str
    version: int
    predictions: list[Prediction]
