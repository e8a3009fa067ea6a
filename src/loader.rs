//! A configuration read and checked whole, as every command that takes one
//! (run and its reloads, check, rules, simulate) reads it: the file's syntax
//! and structure (`config`), what its policies mean (`engine::check`), the
//! files it names, and each script compiled and run once in a sandbox, as a
//! worker will (`script`). Nothing is used until all of it passed.

use std::path::Path;

use crate::config::{self, Config, ConfigError, Knock};

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Checks configuration text read from `path` (for error messages and
/// relative file paths).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let document = config::read(text, path)?;
    crate::engine::check(&document)?;
    let config = document.into_config()?;
    for policy in &config.policies {
        if let Knock::Script(script) = &policy.knock {
            // The script's own file and line, as the one line of the error.
            crate::script::check(script).map_err(|e| ConfigError::Invalid {
                path: script.file.clone(),
                line: e.line,
                key: String::new(),
                message: strip_location(&e.message).to_owned(),
            })?;
        }
    }
    Ok(config)
}

/// A Luau message without its leading `file:line: `, which the error
/// prints itself.
fn strip_location(message: &str) -> &str {
    match message.split_once(".lua:") {
        Some((_, rest)) => match rest.split_once(": ") {
            Some((line, text)) if line.chars().all(|c| c.is_ascii_digit()) => text,
            _ => message,
        },
        None => message,
    }
}
