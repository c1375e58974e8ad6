//! Nexus's configuration file (TOML). `smf/nexus/config.toml` is the real
//! default; `rack-dev run-all` starts from it and fills in ports and paths.
//!
//! Unknown keys are errors, so a misspelt knob is caught at start-up instead
//! of silently taking its default.

use camino::{Utf8Path, Utf8PathBuf};
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub internal_api: ApiConfig,
    pub log: dropshot::ConfigLogging,
    #[serde(default)]
    pub background_tasks: BackgroundTasksConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgresql://user@host:port/dbname`; `nexus --database-url` overrides it.
    pub url: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    16
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address and port to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundTasksConfig {
    #[serde(default)]
    pub tuf_repo_pruner: TufRepoPrunerConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TufRepoPrunerConfig {
    pub period_secs: u64,
    /// Start disabled (it can be enabled at runtime through the internal API).
    #[serde(default)]
    pub disabled: bool,
    /// How many of the newest repositories to keep.
    pub nkeep: u32,
}

impl Default for TufRepoPrunerConfig {
    fn default() -> Self {
        TufRepoPrunerConfig {
            period_secs: 300,
            disabled: false,
            nkeep: 3,
        }
    }
}

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
    Invalid {
        path: Utf8PathBuf,
        key: &'static str,
        problem: String,
    },
}

impl Config {
    pub fn from_file(path: &Utf8Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates; `path` is only used in messages.
    pub fn from_toml(path: &Utf8Path, text: &str) -> Result<Config, ConfigError> {
        // toml's message names the key and shows the offending line.
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        config
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.database.max_connections == 0 {
            return Err(("database.max_connections", "must be at least 1".into()));
        }
        let pruner = &self.background_tasks.tuf_repo_pruner;
        if pruner.period_secs == 0 {
            return Err((
                "background_tasks.tuf_repo_pruner.period_secs",
                "must be at least 1".into(),
            ));
        }
        if pruner.nkeep == 0 {
            return Err((
                "background_tasks.tuf_repo_pruner.nkeep",
                "must be at least 1 (0 would prune every repository)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "test.toml";
    const MINIMAL: &str = r#"
        [database]
        url = "postgresql://postgres@127.0.0.1:5432/rack"
        [internal_api]
        listen = "127.0.0.1:0"
        [log]
        mode = "stderr-terminal"
        level = "info"
    "#;

    fn error_for(text: &str) -> String {
        Config::from_toml(Utf8Path::new(PATH), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_shipped_config_parses() {
        let path = Utf8Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../smf/nexus/config.toml"
        ));
        let config = Config::from_file(path).unwrap();
        assert_eq!(config.background_tasks.tuf_repo_pruner.nkeep, 3);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = Config::from_toml(Utf8Path::new(PATH), MINIMAL).unwrap();
        assert_eq!(config.database.max_connections, 16);
        assert_eq!(config.background_tasks.tuf_repo_pruner.period_secs, 300);
    }

    #[test]
    fn bad_config_names_the_key_and_the_problem() {
        let misspelt = format!(
            "{MINIMAL}\n[background_tasks.tuf_repo_pruner]\nperiod_secs = 5\nnkeep = 3\nnkep = 2\n"
        );
        let message = error_for(&misspelt);
        assert!(
            message.contains(PATH) && message.contains("nkep"),
            "{message}"
        );

        let zero =
            format!("{MINIMAL}\n[background_tasks.tuf_repo_pruner]\nperiod_secs = 5\nnkeep = 0\n");
        assert_eq!(
            error_for(&zero),
            "config file test.toml: background_tasks.tuf_repo_pruner.nkeep must be at least 1 (0 would prune every repository)"
        );

        let wrong_type = MINIMAL.replace("\"127.0.0.1:0\"", "\"not an address\"");
        let message = error_for(&wrong_type);
        assert!(message.contains("listen"), "{message}");

        let message = error_for("[database]\n");
        assert!(message.contains("url"), "{message}");
    }
}
