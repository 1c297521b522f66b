//! Request extractors whose failures are API errors: actix's own answer in plain text, outside
//! OpenAI's envelope, and without naming the parameter.

use crate::api::error::ApiError;
use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest};
use serde::de::DeserializeOwned;
use std::future::{ready, Ready};

/// The query string read into `T`; a value that does not fit is a 400 naming its parameter.
pub struct Query<T>(pub T);

impl<T> std::ops::Deref for Query<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(parse_query(req.query_string()).map(Query))
    }
}

/// Path segments that do not decode (`%FF` is no UTF-8) name nothing that exists: 404.
pub fn path_config() -> actix_web::web::PathConfig {
    actix_web::web::PathConfig::default()
        .error_handler(|e, _| ApiError::not_found(format!("Invalid path: {e}.")).into())
}

pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let pairs = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(pairs).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid_query((path != ".").then_some(path), e.inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Page {
        #[allow(dead_code)]
        limit: Option<usize>,
        #[allow(dead_code)]
        after: Option<String>,
    }

    #[test]
    fn query_errors_name_the_parameter() {
        assert!(parse_query::<Page>("limit=5&after=x&other=1").is_ok());
        let e = parse_query::<Page>("after=x&limit=abc").err().unwrap();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (400, Some("limit"))
        );
        assert!(e.message.contains("invalid digit"), "{}", e.message);
        // Undecodable percent escapes are kept as text, not refused; a NUL is just a character.
        assert!(parse_query::<Page>("after=%FF%00&limit=%31").is_ok());
    }
}
