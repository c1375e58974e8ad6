//! Loading a service's TOML config file: parse, then validate, with messages
//! that name the file, the key and the problem.

use camino::{Utf8Path, Utf8PathBuf};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: Utf8PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: Utf8PathBuf, message: String },
    #[error("config file {path}: {key} {problem}")]
    Invalid { path: Utf8PathBuf, key: &'static str, problem: String },
}

/// A service's config file: parsed, then checked beyond its types.
pub trait ConfigFile: DeserializeOwned {
    /// The offending key and what is wrong with it.
    fn validate(&self) -> Result<(), (&'static str, String)>;

    fn from_file(path: &Utf8Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates; `path` is only used in messages.
    fn from_toml(path: &Utf8Path, text: &str) -> Result<Self, ConfigError> {
        // toml's message names the key and shows the offending line.
        let config: Self = toml::from_str(text)
            .map_err(|error| ConfigError::Parse { path: path.to_owned(), message: error.to_string() })?;
        config.validate().map_err(|(key, problem)| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem,
        })?;
        Ok(config)
    }
}
