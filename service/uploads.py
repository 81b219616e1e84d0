"""Read image bytes from a request: a raw `image/*` body or multipart form fields."""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from service.errors import ApiError

SINGLE_FIELD = "image"
BATCH_FIELD = "images"


def media_type(content_type: str) -> str:
    """Return a Content-Type header's media type, lower case, without parameters."""
    return content_type.split(";")[0].strip().lower()


def is_raw_image(media: str) -> bool:
    """Tell whether a body of this media type is one image's bytes."""
    return media.startswith("image/") or media == "application/octet-stream"


async def read_images(request: Request, *, field: str, max_images: int) -> list[bytes]:
    """Return the uploaded images: one raw body, or every multipart file under `field`."""
    content_type = media_type(request.headers.get("content-type", ""))
    if content_type == "multipart/form-data":
        return await _multipart(request, field, max_images)
    if is_raw_image(content_type):
        if field == BATCH_FIELD:
            raise ApiError(
                415, "unsupported_media_type",
                f"batch requests take multipart/form-data with one or more '{BATCH_FIELD}' "
                "file fields",
            )  # fmt: skip
        return [await request.body()]
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send the image as the raw body with Content-Type image/* (e.g. image/jpeg), or as "
        f"multipart/form-data with a file field '{field}'; got {content_type or 'no type'!r}",
    )


async def _multipart(request: Request, field: str, max_images: int) -> list[bytes]:
    try:
        # Files past 1 MiB spool to disk; the body limit in the middleware bounds the total.
        # One extra file is parsed so "too many" gets its own precise error below.
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except (MultiPartException, HTTPException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
        raise ApiError(400, "invalid_multipart", f"cannot parse multipart body: {detail}") from exc
    try:
        values = form.getlist(field)
        uploads = [item for item in values if isinstance(item, UploadFile)]
        if not uploads:
            present = sorted(set(form.keys())) or "none"
            hint = (
                f"'{field}' is a text field; send it as a file (curl: -F {field}=@photo.jpg)"
                if values
                else f"multipart body has no file field '{field}' (fields: {present})"
            )
            raise ApiError(400, "missing_image", hint)
        if field == SINGLE_FIELD and len(uploads) > 1:
            raise ApiError(
                400, "too_many_images",
                f"'{SINGLE_FIELD}' takes one file; use the /batch endpoint with '{BATCH_FIELD}' "
                "fields for several",
            )  # fmt: skip
        if len(uploads) > max_images:
            raise ApiError(
                413, "too_many_images", f"{len(uploads)} images exceed the limit of {max_images}"
            )
        return [await upload.read() for upload in uploads]
    finally:
        await form.close()
