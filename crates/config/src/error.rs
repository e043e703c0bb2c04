//! The one error type of this crate, and the internal "failure at a node" it is made from.

use std::fmt;

/// Why a config could not be loaded: where (file, line, column, field) and what to do about it.
///
/// Shown as `quickstart.yaml:12:11: limits.chat_user.rate: <message>`, or, when the offending
/// value came from a `SLUICE_*` environment override,
/// `SLUICE_STORAGE__MAX_KEYS (overrides storage.max_keys): <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file's name as given to [`crate::load`] or [`crate::load_str`]; or, when the
    /// offending value came from a `SLUICE_*` override, that variable's name (see
    /// [`ConfigError::is_env_override`]).
    pub source: String,
    /// 1-based line of the offending value, when it came from the file.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the offending value, when it came from the file.
    pub column: Option<usize>,
    /// Dotted path of the offending field, e.g. `limits.chat_user.rate` or `limits.x.rate[1]`.
    pub field: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    /// An error about the file as a whole (for example, it cannot be read).
    pub(crate) fn whole_file(source: &str, message: String) -> Self {
        ConfigError {
            source: source.to_string(),
            line: None,
            column: None,
            field: None,
            message,
        }
    }

    /// Whether the offending value came from a `SLUICE_*` environment override, named by
    /// `source` (such errors have a field but no line).
    pub fn is_env_override(&self) -> bool {
        self.line.is_none() && self.field.is_some()
    }
}

/// The config path an override variable addresses: `SLUICE_STORAGE__MAX_KEYS` → `storage.max_keys`.
pub(crate) fn override_path(var: &str) -> String {
    let rest = var.strip_prefix(crate::overrides::PREFIX).unwrap_or(var);
    rest.split("__")
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_env_override() {
            let var = &self.source;
            let path = override_path(var);
            write!(f, "{var} (overrides {path}): ")?;
            if let Some(field) = self.field.as_deref().filter(|field| *field != path) {
                write!(f, "{field}: ")?;
            }
            return f.write_str(&self.message);
        }
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The config file, 1-based line and column.
    File { line: usize, column: usize },
    /// A `SLUICE_*` override variable.
    Env { var: String },
}

/// A failure found at a node, before the file name is attached.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    pub origin: Origin,
    pub field: Option<String>,
    pub message: String,
    /// The file the failure is in when it is not the main config file (an
    /// `envoy.config_files` entry); `None` for the main file.
    pub file: Option<String>,
}

impl Fail {
    pub(crate) fn new(origin: &Origin, field: &str, message: impl Into<String>) -> Self {
        Fail {
            origin: origin.clone(),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.into(),
            file: None,
        }
    }

    /// The same failure, placed in `file` rather than the main config file.
    pub(crate) fn in_file(self, file: &str) -> Self {
        Fail {
            file: Some(file.to_string()),
            ..self
        }
    }

    pub(crate) fn into_error(self, source: &str) -> ConfigError {
        match self.origin {
            Origin::File { line, column } => ConfigError {
                source: self.file.unwrap_or_else(|| source.to_string()),
                line: Some(line),
                column: Some(column),
                field: self.field,
                message: self.message,
            },
            // A field and no line is what marks an override's error.
            Origin::Env { var } => ConfigError {
                field: Some(self.field.unwrap_or_else(|| override_path(&var))),
                source: var,
                line: None,
                column: None,
                message: self.message,
            },
        }
    }
}

/// `parent.key`, or `key` at the top.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}
