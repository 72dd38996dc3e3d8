//! Config errors that point at `file:line:column`.

use std::fmt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::units::{ByteSize, ConfigDuration};

/// One problem in one config file, at a line and column (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as the operator named it (or as the glob found it).
    pub file: PathBuf,
    /// 1-based line; 1 for problems with the file as a whole.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// Lowercase message that names the field path and the bad value.
    pub message: String,
}

impl ConfigError {
    /// A problem at a YAML location.
    pub fn at(file: &Path, loc: Location, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: loc.line().max(1) as u32,
            column: loc.column().max(1) as u32,
            message: message.into(),
        }
    }

    /// A problem with a file as a whole (unreadable, empty).
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            message: message.into(),
        }
    }

    /// Turns a serde-saphyr error into ours, keeping its line and column.
    pub fn from_yaml(file: &Path, err: &serde_saphyr::Error) -> Self {
        let text = err.without_snippet().to_string();
        // serde-saphyr appends " at line N, column M"; we print the location
        // in front instead, in the `path:line:col:` form editors understand.
        let mut message = match text.rfind(" at line ") {
            Some(cut) => text[..cut].to_string(),
            None => text,
        };
        // Advice meant for programmers embedding the parser, not operators.
        if let Some(cut) = message.find(", set DuplicateKeyPolicy") {
            message.truncate(cut);
        }
        match err.location() {
            Some(loc) => Self::at(file, loc, message),
            None => Self::whole_file(file, message),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a config and its rule files.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

/// Collects problems for one file while a model is being built.
pub struct Problems<'a> {
    file: &'a Path,
    found: &'a mut Vec<ConfigError>,
}

impl<'a> Problems<'a> {
    /// Problems of `file`, appended to `found`.
    pub fn new(file: &'a Path, found: &'a mut Vec<ConfigError>) -> Self {
        Self { file, found }
    }

    /// Records a problem at `loc`.
    pub fn add(&mut self, loc: Location, message: impl Into<String>) {
        self.found.push(ConfigError::at(self.file, loc, message));
    }

    /// How many problems have been found so far (in all files).
    pub fn count(&self) -> usize {
        self.found.len()
    }

    /// The file being checked.
    pub fn file(&self) -> &Path {
        self.file
    }

    /// Reports a missing required key at `at` (the enclosing mapping).
    pub fn required<'r, T>(
        &mut self,
        at: Location,
        field: &str,
        v: &'r Option<Spanned<T>>,
    ) -> Option<&'r Spanned<T>> {
        if v.is_none() {
            self.add(at, format!("missing required key `{field}`"));
        }
        v.as_ref()
    }

    /// A parsed duration, or the parse problem recorded under `field`.
    pub fn duration(&mut self, field: &str, v: &Spanned<ConfigDuration>) -> Option<Duration> {
        match &v.value.0 {
            Ok(d) => Some(*d),
            Err(e) => {
                self.add(v.referenced, format!("{field}: {e}"));
                None
            }
        }
    }

    /// A parsed byte size, or the parse problem recorded under `field`.
    pub fn size(&mut self, field: &str, v: &Spanned<ByteSize>) -> Option<u64> {
        match &v.value.0 {
            Ok(n) => Some(*n),
            Err(e) => {
                self.add(v.referenced, format!("{field}: {e}"));
                None
            }
        }
    }

    /// Takes `Ok` through, records `Err` at `loc` and gives `None`.
    pub fn check<T>(&mut self, loc: Location, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.add(loc, message);
                None
            }
        }
    }
}
