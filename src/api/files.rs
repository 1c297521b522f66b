//! `POST /v1/files` (multipart upload), `GET /v1/files`, `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
//!
//! Uploads with purpose `fine-tune` are validated before they are accepted: every line must be a
//! chat (`{"messages": [...]}` with an assistant turn) or prompt/completion example; a 400 names
//! the failing lines and rules. Uploads larger than `fine_tuning.max_file_bytes` get 413.

use crate::api::error::ApiError;
use crate::api::extractors::Query;
use crate::api::AppState;
use crate::engine::unix_now;
use crate::store::{FileRecord, Store};
use crate::train::data::parse_jsonl;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

/// Purposes accepted on upload (OpenAI's list); only `fine-tune` content is validated.
const UPLOAD_PURPOSES: [&str; 6] = [
    "fine-tune",
    "assistants",
    "batch",
    "vision",
    "user_data",
    "evals",
];
/// Room for the multipart framing around the file itself.
const MULTIPART_SLACK: usize = 64 << 10;

/// A 400 `invalid_request_error` naming the offending parameter.
pub fn bad_request(message: impl Into<String>, param: Option<&str>, code: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
        kind: "invalid_request_error",
        param: param.map(String::from),
        code: Some(code.into()),
        retry_after: None,
    }
}

pub fn internal(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("{e:#}"))
}

/// OpenAI's `OpenAIFile` object.
pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "expires_at": null,
        "filename": f.filename, "purpose": f.purpose, "status": "processed", "status_details": null,
    })
}

pub fn file_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"))
}

fn store(state: &AppState) -> &Store {
    &state.fine_tuning.store
}

/// One part of a `multipart/form-data` body.
struct Part<'a> {
    name: String,
    filename: Option<String>,
    content: &'a [u8],
}

/// RFC 2046's longest boundary.
const MAX_BOUNDARY: usize = 70;

/// Linear in the haystack whatever the needle (a two-way search).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// `name="value"` from a `Content-Disposition` header.
fn disposition_param(header: &str, key: &str) -> Option<String> {
    header.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Splits a multipart body (RFC 7578) into its parts.
fn parse_multipart<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, ApiError> {
    let malformed = |why: &str| {
        bad_request(
            format!("Malformed multipart/form-data body: {why}."),
            None,
            "invalid_multipart",
        )
    };
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Err(bad_request(
            "Upload files as multipart/form-data with `file` and `purpose` fields.",
            None,
            "invalid_content_type",
        ));
    }
    let boundary = disposition_param(content_type, "boundary")
        .filter(|b| !b.is_empty())
        .ok_or_else(|| malformed("no boundary"))?;
    if boundary.len() > MAX_BOUNDARY {
        return Err(malformed("a boundary longer than 70 characters"));
    }
    let delimiter = format!("--{boundary}").into_bytes();
    let mut rest = &body[find(body, &delimiter)
        .ok_or_else(|| malformed("no opening boundary"))?
        + delimiter.len()..];
    let mut parts = Vec::new();
    loop {
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        rest = rest
            .strip_prefix(b"\r\n")
            .ok_or_else(|| malformed("bad boundary line"))?;
        let headers_end =
            find(rest, b"\r\n\r\n").ok_or_else(|| malformed("unterminated part headers"))?;
        let headers = std::str::from_utf8(&rest[..headers_end])
            .map_err(|_| malformed("non-UTF-8 part headers"))?;
        let after_headers = &rest[headers_end + 4..];
        let mut closing = b"\r\n".to_vec();
        closing.extend_from_slice(&delimiter);
        let end =
            find(after_headers, &closing).ok_or_else(|| malformed("missing closing boundary"))?;
        let disposition = headers
            .split("\r\n")
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
                    .map(|(_, v)| v.to_string())
            })
            .ok_or_else(|| malformed("a part without Content-Disposition"))?;
        parts.push(Part {
            name: disposition_param(&disposition, "name").unwrap_or_default(),
            filename: disposition_param(&disposition, "filename"),
            content: &after_headers[..end],
        });
        rest = &after_headers[end + closing.len()..];
    }
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let limit = state.settings.fine_tuning.max_file_bytes;
    let body_limit = limit.saturating_add(MULTIPART_SLACK);
    let body = crate::api::read_body_within(&state, &req, payload, body_limit)
        .await
        .map_err(|e| match e.status {
            // The limit users set and see is the file's, not the framing's.
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::body_too_large(limit),
            _ => e,
        })?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // Splitting and validating tens of megabytes is CPU work: off the HTTP workers.
    let record =
        crate::api::off_worker(move || store_upload(&state, &content_type, &body, limit)).await?;
    Ok(HttpResponse::Ok().json(file_object(&record)))
}

/// Longest filename kept with an upload (a common file system's limit).
const MAX_FILENAME_BYTES: usize = 255;

fn store_upload(
    state: &AppState,
    content_type: &str,
    body: &[u8],
    limit: usize,
) -> Result<FileRecord, ApiError> {
    let parts = parse_multipart(content_type, body)?;
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose")
        .map(|p| String::from_utf8_lossy(p.content).trim().to_string())
        .ok_or_else(|| {
            bad_request(
                "Missing required parameter: 'purpose'.",
                Some("purpose"),
                "missing_required_parameter",
            )
        })?;
    if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
        return Err(bad_request(
            format!(
                "'{}' is not a valid purpose; expected one of {}.",
                purpose.chars().take(64).collect::<String>(),
                UPLOAD_PURPOSES.join(", ")
            ),
            Some("purpose"),
            "invalid_value",
        ));
    }
    let file = parts.iter().find(|p| p.name == "file").ok_or_else(|| {
        bad_request(
            "Missing required parameter: 'file'.",
            Some("file"),
            "missing_required_parameter",
        )
    })?;
    if file.content.len() > limit {
        return Err(ApiError::body_too_large(limit));
    }
    let filename = file
        .filename
        .clone()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "upload.jsonl".into());
    if filename.len() > MAX_FILENAME_BYTES || filename.contains('\0') {
        return Err(bad_request(
            format!("The filename must be at most {MAX_FILENAME_BYTES} bytes, without NUL."),
            Some("file"),
            "invalid_value",
        ));
    }
    if purpose == "fine-tune" {
        validate_training_file(file.content)?;
    }
    let record = FileRecord {
        id: crate::store::new_id("file-"),
        bytes: file.content.len() as u64,
        created_at: unix_now(),
        filename,
        purpose,
    };
    state
        .fine_tuning
        .store
        .insert_file(&record, file.content)
        .map_err(internal)?;
    Ok(record)
}

/// 400 unless every line is a valid training example; the message names the first bad lines.
fn validate_training_file(content: &[u8]) -> Result<(), ApiError> {
    let text = std::str::from_utf8(content).map_err(|e| {
        bad_request(
            format!(
                "The file is not UTF-8 (invalid byte at offset {}).",
                e.valid_up_to()
            ),
            Some("file"),
            "invalid_file_format",
        )
    })?;
    parse_jsonl(text).map(|_| ()).map_err(|errors| {
        let shown: Vec<String> = errors.iter().take(5).map(ToString::to_string).collect();
        let more = if errors.len() > 5 { format!(" (and {} more)", errors.len() - 5) } else { String::new() };
        bad_request(
            format!(
                "Invalid file format for fine-tuning: {}{more}. Each line must be {{\"messages\": [...]}} with an assistant message, or {{\"prompt\": ..., \"completion\": ...}}.",
                shown.join("; ")
            ),
            Some("file"),
            "invalid_file_format",
        )
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
    after: Option<String>,
}

pub async fn list(
    state: web::Data<AppState>,
    query: Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(bad_request(
            "`limit` must be between 1 and 10000.",
            Some("limit"),
            "invalid_value",
        ));
    }
    let ascending = match query.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(bad_request(
                format!("`order` must be `asc` or `desc`, not `{other}`."),
                Some("order"),
                "invalid_value",
            ))
        }
    };
    let page = store(&state)
        .list_files(
            query.purpose.as_deref(),
            query.after.as_deref(),
            limit,
            ascending,
        )
        .map_err(internal)?;
    let data: Vec<Value> = page.data.iter().map(file_object).collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list", "data": data, "has_more": page.has_more,
        "first_id": page.data.first().map(|f| f.id.clone()), "last_id": page.data.last().map(|f| f.id.clone()),
    })))
}

pub async fn retrieve(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let file = store(&state)
        .file(&id)
        .map_err(internal)?
        .ok_or_else(|| file_not_found(&id))?;
    Ok(HttpResponse::Ok().json(file_object(&file)))
}

pub async fn content(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let file = store(&state)
        .file(&id)
        .map_err(internal)?
        .ok_or_else(|| file_not_found(&id))?;
    let id = file.id.clone();
    let bytes =
        crate::api::off_worker(move || store(&state).read_file(&id).map_err(internal)).await?;
    Ok(download(&file.filename, &file.purpose).body(bytes))
}

/// Headers for a file's content. Whatever a client uploaded goes out as an attachment of type
/// `application/octet-stream` that browsers must not sniff, so no upload (an SVG or HTML with
/// script in it) ever renders in the page of whoever opens the link. Only the result files rewind
/// writes itself (purpose `fine-tune-results`: the metrics CSV and the loss plot) keep their type,
/// and a content security policy forbids every script and fetch even in those.
fn download(filename: &str, purpose: &str) -> actix_web::HttpResponseBuilder {
    let own = purpose == "fine-tune-results";
    let kind = match filename.rsplit('.').next() {
        Some("csv") if own => "text/csv",
        Some("svg") if own => "image/svg+xml",
        _ => "application/octet-stream",
    };
    // Only the name's safe characters reach the header (no quote, CR or LF to break out of it).
    let safe_name: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut response = HttpResponse::Ok();
    response
        .content_type(kind)
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; sandbox",
        ))
        .insert_header((
            "Content-Disposition",
            format!(
                "{}; filename=\"{safe_name}\"",
                if own { "inline" } else { "attachment" }
            ),
        ));
    response
}

pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let file = id.clone();
    let deleted =
        crate::api::off_worker(move || store(&state).delete_file(&file).map_err(internal)).await?;
    if !deleted {
        return Err(file_not_found(&id));
    }
    Ok(HttpResponse::Ok().json(json!({"id": id, "object": "file", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_parts_are_split() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\nline1\r\nline2\r\n--XyZ--\r\n";
        let parts = parse_multipart("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), parts[0].content),
            ("purpose", &b"fine-tune"[..])
        );
        assert_eq!(parts[1].filename.as_deref(), Some("a.jsonl"));
        assert_eq!(parts[1].content, b"line1\r\nline2");
        assert!(parse_multipart("multipart/form-data; boundary=XyZ", b"garbage").is_err());
        assert!(parse_multipart("application/json", body).is_err());
    }
}
