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

/// A 503 whose message the client sees (dropshot's own `for_unavail` hides
/// it): the caller should know which dependency is down.
pub fn unavailable(message: String) -> dropshot::HttpError {
    dropshot::HttpError {
        status_code: dropshot::ErrorStatusCode::SERVICE_UNAVAILABLE,
        error_code: Some("UNAVAILABLE".to_string()),
        internal_message: message.clone(),
        external_message: message,
        headers: None,
    }
}
