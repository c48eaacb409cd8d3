"""The service's request and reply shapes, for /docs and /openapi.json. The routes read requests themselves
(inputs.py: limits are checked while the body streams in), so these models document; they validate nothing."""
from __future__ import annotations

from typing import Dict, List, Optional, Union

from pydantic import BaseModel, Field

Weights = Union[str, List[str], Dict[str, float]]
Where = Union[str, Dict[str, Union[str, List[str]]]]


class SearchJSON(BaseModel):
    """POST /search as JSON: exactly one of key or vector (an upload is sent as multipart/form-data)."""
    key: Optional[str] = Field(None, description="a catalogue key: its own vectors are the query; it is not a hit")
    vector: Optional[Dict[str, List[float]]] = Field(
        None, description="{attribute: embedding} (embed_dim numbers each), one per attribute ranked by")
    attributes: Weights = Field(..., description="'colour' or 'colour:1,pattern:0.5' or {name: weight}; at "
                                                 "least one weight above 0", examples=["colour:1,pattern:0.5"])
    k: int = Field(10, ge=1, description="hits per page (at most --max-k)")
    offset: int = Field(0, ge=0, description="hits to skip: page n of k is offset n*k")
    where: Optional[Where] = Field(None, description="'column=value,...' or {column: value or [values]}: keep "
                                                     "items whose labels match (any label column)")


class SearchForm(BaseModel):
    """POST /search as multipart/form-data (an upload) or url-encoded fields."""
    image: Optional[bytes] = Field(None, description="JPEG, PNG, GIF or WebP (first frame); at most "
                                                     "--max-upload-mb and --max-pixels")
    key: Optional[str] = None
    attributes: str = Field(..., examples=["colour:1,pattern:0.5"])
    k: int = 10
    offset: int = 0
    where: Optional[str] = Field(None, examples=["colour=red"])


class Item(BaseModel):
    key: str
    values: Dict[str, Optional[str]] = Field(description="every label column of the catalogue for this item")
    image: str = Field(description="GET this for the item's image")


class QueryEcho(BaseModel):
    key: Optional[str]
    values: Dict[str, Optional[str]]
    image: Optional[str]
    upload_bytes: Optional[int] = None
    vector: Optional[bool] = None


class SearchHit(BaseModel):
    rank: int = Field(description="1 = best, counted from the first page")
    key: str
    score: float = Field(description="sum over attributes of weight x cosine similarity")
    scores: Dict[str, float] = Field(description="each attribute's cosine similarity (the score's parts)")
    values: Dict[str, Optional[str]]
    image: str


class SearchReply(BaseModel):
    query: QueryEcho
    attributes: Dict[str, float]
    k: int
    offset: int
    where: Dict[str, List[str]]
    seconds: float
    hits: List[SearchHit]


class Items(BaseModel):
    total: int
    items: List[Item]


class Limits(BaseModel):
    max_k: int
    max_offset: int
    max_upload_bytes: int
    max_pixels: int


class AttributesReply(BaseModel):
    attributes: List[str] = Field(description="attributes with an index: what a search can rank by")
    uploads: bool = Field(description="whether image uploads can be embedded (the service has a model)")
    labels: Dict[str, List[str]] = Field(description="each label column's values (at most 500): the filters")
    items: int
    embed_dim: Dict[str, int]
    limits: Limits


class HealthReply(BaseModel):
    status: str
    version: str
    items: int
    source: str
    uptime_s: float
    searches: int
    embedding: Optional[Dict[str, float]]


class ErrorReply(BaseModel):
    error: str = Field(description="one line saying what was wrong and what to send instead")


ERRORS = {s: {"model": ErrorReply} for s in (400, 404, 413, 415, 421, 422, 500)}


def search_body() -> dict:
    """openapi_extra for POST /search: its two request encodings."""
    ref = "#/components/schemas/{model}"
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchJSON.model_json_schema(ref_template=ref)},
        "multipart/form-data": {"schema": SearchForm.model_json_schema(ref_template=ref)},
        "application/x-www-form-urlencoded": {"schema": SearchForm.model_json_schema(ref_template=ref)}}}}
