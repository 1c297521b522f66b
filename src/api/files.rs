//! `POST /v1/files` (multipart upload), `GET /v1/files`, `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
//!
//! An upload is parsed as it arrives (actix-multipart) and its `file` part streamed to a
//! temporary file in the files area, published atomically ([`crate::durable::PendingFile`]) once
//! it is complete and accepted, so its size costs disk, not memory. Uploads with purpose
//! `fine-tune` are validated, a line at a time, before they are accepted: every line must be a
//! chat (`{"messages": [...]}` with an assistant turn) or prompt/completion example; a 400 names
//! the failing lines and rules. Uploads larger than `fine_tuning.max_file_bytes` get 413, bodies
//! that stall for `limits.body_timeout_secs` 408.

use crate::api::error::ApiError;
use crate::api::extractors::Query;
use crate::api::AppState;
use crate::durable::PendingFile;
use crate::engine::unix_now;
use crate::store::{FileRecord, Store};
use crate::train::data::{parse_line, LineError};
use actix_multipart::{Field, Multipart, MultipartError};
use actix_web::error::PayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::web::Bytes;
use actix_web::{mime, web, HttpMessage, HttpRequest, HttpResponse};
use anyhow::Context;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

/// Purposes accepted on upload (OpenAI's list); only `fine-tune` content is validated.
const UPLOAD_PURPOSES: [&str; 6] = [
    "fine-tune",
    "assistants",
    "batch",
    "vision",
    "user_data",
    "evals",
];
/// Room for the multipart framing (boundaries, part headers, the other fields) around the file.
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

/// Longest filename kept with an upload (a common file system's limit).
const MAX_FILENAME_BYTES: usize = 255;
/// Longest `purpose` read (the longest valid one is 11 bytes; a longer one is refused).
const MAX_PURPOSE_BYTES: usize = 64;
/// Chunks of an upload queued for its writer thread: at most this many times actix-multipart's
/// 64 KiB parser buffer, so a disk slower than the network holds the client back instead of
/// filling memory.
const WRITE_QUEUE: usize = 16;

/// `POST /v1/files`: the `multipart/form-data` body is parsed as it arrives (actix-multipart) and
/// the `file` part streamed to a temporary file in the files area, so an upload of any size
/// takes a few chunks of memory. The content is published (fsync, rename) and its record
/// committed only once it is complete and valid; a refused or broken upload leaves nothing.
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let limit = state.settings.fine_tuning.max_file_bytes;
    let mut form = UploadForm::new(&state, &req, payload, limit)?;
    let mut purpose = None;
    let mut file = None;
    while let Some(mut field) = form.next_field().await? {
        match field.name() {
            Some("purpose") if purpose.is_none() => {
                let text = form.read_text(&mut field, MAX_PURPOSE_BYTES).await?;
                // Refused before the file is received when the purpose comes first.
                purpose = Some(valid_purpose(text)?);
            }
            Some("file") if file.is_none() => file = Some(form.receive_file(&state, field).await?),
            // Other fields, and repeated ones, are read past.
            _ => while form.next_chunk(&mut field).await?.is_some() {},
        }
    }
    let purpose = purpose.ok_or_else(|| {
        bad_request(
            "Missing required parameter: 'purpose'.",
            Some("purpose"),
            "missing_required_parameter",
        )
    })?;
    let file = file.ok_or_else(|| {
        bad_request(
            "Missing required parameter: 'file'.",
            Some("file"),
            "missing_required_parameter",
        )
    })?;
    // Validating a training file of tens of megabytes and fsyncing the content are blocking
    // work: off the HTTP workers.
    let record = crate::api::off_worker(move || {
        if purpose == "fine-tune" {
            validate_training_file(file.content.path())?;
        }
        let record = FileRecord {
            id: file.id,
            bytes: file.bytes,
            created_at: unix_now(),
            filename: file.filename,
            purpose,
        };
        store(&state)
            .insert_pending_file(&record, file.content)
            .map_err(internal)?;
        Ok(record)
    })
    .await?;
    Ok(HttpResponse::Ok().json(file_object(&record)))
}

/// The purpose sent (None: longer than [`MAX_PURPOSE_BYTES`]), if it is one an upload may have.
fn valid_purpose(text: Option<String>) -> Result<String, ApiError> {
    let shown = match text {
        Some(purpose) if UPLOAD_PURPOSES.contains(&purpose.as_str()) => return Ok(purpose),
        Some(other) => format!("'{other}' is not a valid purpose"),
        None => format!("The purpose is longer than {MAX_PURPOSE_BYTES} bytes"),
    };
    Err(bad_request(
        format!("{shown}; expected one of {}.", UPLOAD_PURPOSES.join(", ")),
        Some("purpose"),
        "invalid_value",
    ))
}

/// A `file` part received in full: its content waits, unpublished, for the checks that need the
/// other parts.
struct ReceivedFile {
    id: String,
    filename: String,
    bytes: u64,
    content: PendingFile,
}

/// An upload's body as multipart fields, each read within the idle bound
/// (`limits.body_timeout_secs`: 408 past it) and the whole within the size bound (413).
struct UploadForm {
    fields: Multipart,
    /// `fine_tuning.max_file_bytes`, the bound users set and see.
    limit: usize,
    idle: Duration,
    /// Set once the body passes the file's limit and the framing's slack.
    too_large: Rc<Cell<bool>>,
}

impl UploadForm {
    fn new(
        state: &AppState,
        req: &HttpRequest,
        payload: web::Payload,
        limit: usize,
    ) -> Result<Self, ApiError> {
        let form_data = req
            .mime_type()
            .ok()
            .flatten()
            .is_some_and(|m| m.type_() == mime::MULTIPART && m.subtype() == mime::FORM_DATA);
        if !form_data {
            return Err(bad_request(
                "Upload files as multipart/form-data with `file` and `purpose` fields.",
                None,
                "invalid_content_type",
            ));
        }
        let body_limit = limit.saturating_add(MULTIPART_SLACK);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|len| len > body_limit) {
            return Err(ApiError::body_too_large(limit));
        }
        let too_large = Rc::new(Cell::new(false));
        let flag = too_large.clone();
        let mut received = 0usize;
        let counted = payload.map(move |chunk| {
            let chunk = chunk?;
            received += chunk.len();
            if received > body_limit {
                flag.set(true);
                return Err(PayloadError::Overflow);
            }
            Ok(chunk)
        });
        Ok(Self {
            fields: Multipart::new(req.headers(), counted),
            limit,
            idle: Duration::from_secs(state.settings.limits.body_timeout_secs),
            too_large,
        })
    }

    async fn next_field(&mut self) -> Result<Option<Field>, ApiError> {
        match actix_web::rt::time::timeout(self.idle, self.fields.next()).await {
            Err(_) => Err(ApiError::body_timeout(self.idle.as_secs())),
            Ok(next) => next.transpose().map_err(|e| self.refusal(e)),
        }
    }

    async fn next_chunk(&self, field: &mut Field) -> Result<Option<Bytes>, ApiError> {
        match actix_web::rt::time::timeout(self.idle, field.next()).await {
            Err(_) => Err(ApiError::body_timeout(self.idle.as_secs())),
            Ok(next) => next.transpose().map_err(|e| self.refusal(e)),
        }
    }

    /// A text field's value (lossy UTF-8, trimmed); None when it is longer than `max` bytes.
    async fn read_text(&self, field: &mut Field, max: usize) -> Result<Option<String>, ApiError> {
        let mut value = Vec::new();
        let mut fits = true;
        while let Some(chunk) = self.next_chunk(field).await? {
            fits &= value.len() + chunk.len() <= max;
            if fits {
                value.extend_from_slice(&chunk);
            }
        }
        Ok(fits.then(|| String::from_utf8_lossy(&value).trim().to_string()))
    }

    /// Streams the `file` part into a temporary file in the files area, written on a blocking
    /// thread fed through a bounded queue. On any refusal the temporary is removed (by the
    /// writer, once it has closed it).
    async fn receive_file(
        &self,
        state: &AppState,
        mut field: Field,
    ) -> Result<ReceivedFile, ApiError> {
        let filename = field
            .content_disposition()
            .and_then(|d| d.get_filename())
            .filter(|f| !f.is_empty())
            .unwrap_or("upload.jsonl")
            .to_string();
        if filename.len() > MAX_FILENAME_BYTES || filename.contains('\0') {
            return Err(bad_request(
                format!("The filename must be at most {MAX_FILENAME_BYTES} bytes, without NUL."),
                Some("file"),
                "invalid_value",
            ));
        }
        let id = crate::store::new_id("file-");
        let content = store(state).pending_file(&id).map_err(internal)?;
        let (queue, mut chunks) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let writer = actix_web::rt::task::spawn_blocking(move || -> anyhow::Result<PendingFile> {
            let path = content.path();
            let mut out = std::fs::File::create_new(path)
                .with_context(|| format!("creating {}", path.display()))?;
            while let Some(chunk) = chunks.blocking_recv() {
                out.write_all(&chunk)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(content)
        });
        let mut bytes = 0u64;
        while let Some(chunk) = self.next_chunk(&mut field).await? {
            bytes += chunk.len() as u64;
            if bytes > self.limit as u64 {
                return Err(ApiError::body_too_large(self.limit));
            }
            if queue.send(chunk).await.is_err() {
                break; // the writer failed: its error is reported below
            }
        }
        drop(queue);
        let content = writer
            .await
            .map_err(|_| ApiError::internal("the upload's writer failed"))?
            .map_err(internal)?;
        Ok(ReceivedFile {
            id,
            filename,
            bytes,
            content,
        })
    }

    /// The answer to a body the parser could not read.
    fn refusal(&self, e: MultipartError) -> ApiError {
        if self.too_large.get() {
            // The limit users set and see is the file's, not the framing's.
            return ApiError::body_too_large(self.limit);
        }
        let malformed = |why: &str| {
            bad_request(
                format!("Malformed multipart/form-data body: {why}."),
                None,
                "invalid_multipart",
            )
        };
        match e {
            MultipartError::Payload(PayloadError::Overflow) => {
                malformed("a line or a part's headers longer than 64 KiB")
            }
            MultipartError::Payload(e) => {
                ApiError::invalid_body(format!("The request body could not be read: {e}."))
            }
            MultipartError::Parse(_) => malformed("a part's headers are invalid"),
            e => malformed(&e.to_string()),
        }
    }
}

/// 400 unless every line is a valid training example; the message names the first bad lines.
/// The file is read a line at a time, so only the longest line is ever in memory.
fn validate_training_file(path: &Path) -> Result<(), ApiError> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))
        .map_err(internal)?;
    let mut reader = BufReader::with_capacity(64 << 10, file);
    let mut line = Vec::new();
    let (mut number, mut offset, mut examples) = (0, 0, 0);
    let (mut shown, mut errors) = (Vec::new(), 0);
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(internal)?;
        if read == 0 {
            break;
        }
        number += 1;
        let text = std::str::from_utf8(&line).map_err(|e| {
            bad_request(
                format!(
                    "The file is not UTF-8 (invalid byte at offset {}).",
                    offset + e.valid_up_to()
                ),
                Some("file"),
                "invalid_file_format",
            )
        })?;
        offset += read;
        // As `str::lines` splits: at `\n`, without a `\r` before it.
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(text) {
            Ok(_) => examples += 1,
            Err(reason) => {
                errors += 1;
                if shown.len() < 5 {
                    shown.push(
                        LineError {
                            line: number,
                            reason,
                        }
                        .to_string(),
                    );
                }
            }
        }
    }
    if examples + errors == 0 {
        shown.push(
            LineError {
                line: 1,
                reason: "the file has no examples".into(),
            }
            .to_string(),
        );
        errors = 1;
    }
    if errors == 0 {
        return Ok(());
    }
    let more = if errors > 5 {
        format!(" (and {} more)", errors - 5)
    } else {
        String::new()
    };
    Err(bad_request(
        format!(
            "Invalid file format for fine-tuning: {}{more}. Each line must be {{\"messages\": [...]}} with an assistant message, or {{\"prompt\": ..., \"completion\": ...}}.",
            shown.join("; ")
        ),
        Some("file"),
        "invalid_file_format",
    ))
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

    /// The answer to a training file of `content`: None when it is accepted, else the message.
    fn validated(content: &[u8]) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upload");
        std::fs::write(&path, content).unwrap();
        validate_training_file(&path).err().map(|e| {
            assert_eq!(
                (e.status, e.param.as_deref()),
                (StatusCode::BAD_REQUEST, Some("file"))
            );
            e.message
        })
    }

    #[test]
    fn a_training_file_is_validated_a_line_at_a_time() {
        let good = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
        let pair = r#"{"prompt": "a", "completion": "b"}"#;
        // Many lines, past the reader's 64 KiB buffer, with CRLF and blank lines.
        let many = format!("{good}\r\n\n{pair}\n").repeat(2_000);
        assert_eq!(validated(many.as_bytes()), None);
        assert_eq!(validated(format!("{good}\n   \n{pair}").as_bytes()), None);

        // Bad lines are named by number (blank lines counted), the first five shown.
        let message = validated(format!("{good}\n\n[1]\n{pair}\nnope\n").as_bytes()).unwrap();
        assert!(
            message.contains("line 3: each line must be a JSON object"),
            "{message}"
        );
        assert!(message.contains("line 5: invalid JSON"), "{message}");
        let message = validated("{\"prompt\": 1}\n".repeat(8).as_bytes()).unwrap();
        assert!(
            message.contains("line 5:") && !message.contains("line 6:"),
            "{message}"
        );
        assert!(message.contains("(and 3 more)"), "{message}");

        // Not UTF-8: the offset of the first bad byte in the whole file.
        let mut bytes = format!("{good}\n{pair}\n").into_bytes();
        let at = bytes.len() + 3;
        bytes.extend_from_slice(b"{\"a\xFF\": 1}\n");
        let message = validated(&bytes).unwrap();
        assert!(message.contains(&format!("offset {at}")), "{message}");

        // Nothing to train on.
        for empty in [&b""[..], b"\n\n  \r\n"] {
            let message = validated(empty).unwrap();
            assert!(message.contains("the file has no examples"), "{message}");
        }
    }
}
