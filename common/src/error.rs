//! Error helpers shared by the binaries and servers.

use std::error::Error;

/// An error and all its causes, joined with ": ", for logs and messages that
/// must keep the whole story.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A 5xx error whose message the client sees (dropshot's own helpers hide
/// it): the caller should know which dependency failed, and how.
///
/// Panics if `status` is not an error status: callers pass constants.
pub fn server_error(status: http::StatusCode, code: &str, message: String) -> dropshot::HttpError {
    dropshot::HttpError {
        status_code: dropshot::ErrorStatusCode::from_status(status).expect("an error status"),
        error_code: Some(code.to_string()),
        internal_message: message.clone(),
        external_message: message,
        headers: None,
    }
}

pub fn unavailable(message: String) -> dropshot::HttpError {
    server_error(http::StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
}
