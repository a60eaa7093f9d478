//! How a setting is declared. `declare_settings!` turns one declaration
//! per setting — its name, type, flag value name and parser, environment
//! variable, default, check, whether a reload may change it, and its doc
//! comment as the help — into everything that used to be written out per
//! setting:
//!
//! - the [`Config`](super::Config) struct the relay runs with (one field
//!   per setting, resolved);
//! - the [`Layer`](super::Layer) that one source fills (every field an
//!   `Option`): with clap's derive it is the flags and their environment
//!   variables; the config file fills another (its keys are the flag
//!   names); precedence is `Layer::or`;
//! - the per-setting checks, the reload diff
//!   ([`Config::differences`](super::Config::differences)), the shown
//!   values of `--check-config`;
//! - [`ALL`](super::settings::ALL), the list that the help's defaults and
//!   the settings table in docs/OPERATIONS.md are written from.
//!
//! Why a macro and not serde's derive for the file: one list has to drive
//! clap, the file, precedence, checks and reload together, and the file's
//! errors must stay in our words (the line, the key, what was expected).
//! ripgrep's `flags/defs.rs` keeps a flag's name, doc and parsing in one
//! item for the same reason.

use super::values::Value;

/// Whether a running relay takes a new value of a setting on SIGHUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied by the loops between two batches of datagrams.
    Live,
    /// Used once, at start (the sockets, the loops, the endpoints, the
    /// cluster link): a new value is refused by name and the running one
    /// kept until a restart.
    Restart,
}

impl Reload {
    /// Whether a change needs a restart.
    pub fn is_restart(self) -> bool {
        self == Reload::Restart
    }

    /// `live` or `restart`, for the docs table.
    pub fn word(self) -> &'static str {
        match self {
            Reload::Live => "live",
            Reload::Restart => "restart",
        }
    }
}

/// A setting's default, for the help and the docs.
#[derive(Debug, Clone, Copy)]
pub enum Shown {
    /// A value, shown the way the setting shows its values.
    Value(fn() -> String),
    /// What happens without one, in words (`no limit`, `twice the rate`).
    Words(&'static str),
}

impl Shown {
    /// The default in words.
    pub fn text(self) -> String {
        match self {
            Shown::Value(show) => show(),
            Shown::Words(words) => words.to_string(),
        }
    }
}

/// What a declaration says about its setting, for what lists settings:
/// the file's keys, the help's defaults, the docs table.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The field name (`no_echo`); the flag and the file key are it in
    /// kebab case (`--no-echo`, `no-echo`).
    pub name: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// What the flag's value is called in the help (`ADDR`, `N`).
    pub value_name: &'static str,
    /// Whether the flag may stand alone (a yes-or-no setting).
    pub switch: bool,
    /// The doc comment: its first paragraph is the short help.
    pub doc: &'static str,
    /// The default.
    pub default: Shown,
    /// Whether a reload may change it.
    pub reload: Reload,
}

impl Setting {
    /// The config file's key, which is the flag's name.
    pub fn key(&self) -> String {
        self.name.replace('_', "-")
    }

    /// The flag with its value, as the help writes it: `--bind <ADDR>`,
    /// `--no-echo [<BOOL>]`.
    pub fn flag(&self) -> String {
        if self.switch {
            format!("--{} [<{}>]", self.key(), self.value_name)
        } else {
            format!("--{} <{}>", self.key(), self.value_name)
        }
    }

    /// The doc comment's paragraphs, each on one line.
    pub fn paragraphs(&self) -> Vec<String> {
        paragraphs(self.doc)
    }
}

/// Whether `key` (from the config file) names the field `name`: the key is
/// the name in kebab case (`no-echo` for `no_echo`; `no_echo` is not a key).
pub fn is_key(name: &str, key: &str) -> bool {
    name.len() == key.len()
        && name
            .bytes()
            .zip(key.bytes())
            .all(|(n, k)| if n == b'_' { k == b'-' } else { n == k })
}

/// A doc comment's paragraphs, each joined onto one line.
fn paragraphs(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in doc.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                out.push(current.join(" "));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    if !current.is_empty() {
        out.push(current.join(" "));
    }
    out
}

/// One setting whose value differs between two configurations (a reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The setting's key (`max-clients`).
    pub key: String,
    /// The value before, in words.
    pub from: String,
    /// The value wanted, in words.
    pub to: String,
    /// Whether it may change while the relay runs.
    pub reload: Reload,
}

/// clap's short help (`-h`): the doc's first paragraph and the default.
pub fn clap_help(doc: &str, default: Shown) -> String {
    let first = paragraphs(doc).into_iter().next().unwrap_or_default();
    format!("{first} [default: {}]", default.text())
}

/// clap's long help (`--help`, the man page): the whole doc and the
/// default.
pub fn clap_long_help(doc: &str, default: Shown) -> String {
    let mut text = paragraphs(doc).join("\n\n");
    text.push_str(&format!("\n\n[default: {}]", default.text()));
    text
}

/// How many values the flag takes: a switch none or one (`--no-echo`,
/// `--no-echo=false`), anything else exactly one.
pub fn num_args<T: Value>() -> clap::builder::ValueRange {
    if T::SWITCH {
        clap::builder::ValueRange::new(0..=1)
    } else {
        clap::builder::ValueRange::new(1)
    }
}

/// What a switch means alone: `true`.
pub fn missing_value<T: Value>() -> Option<&'static str> {
    T::SWITCH.then_some("true")
}

/// Declares `udphub serve`'s settings; see the module doc. Each setting:
///
/// ```text
/// /// Help: the first paragraph is the short help, all of it the long one.
/// name: Type {
///     env: "UDPHUB_NAME",              // its environment variable
///     value: "N",                      // the flag's value in the help
///     parse: parser,                   // fn(&str) -> Result<Type, String>, for flag, env and file
///     default: value(expr),            // or none("words"): Option<Type>; or computed(fn, "words")
///     check: check,                    // fn(&Type) -> Result<(), String>, run on the resolved value
///     reload: Live,                    // or Restart
/// }
/// ```
///
/// and after them, `loaded { … }`: fields of [`Config`](super::Config)
/// that are not settings but read from where a setting points (the room
/// secret), filled in by the resolution.
macro_rules! declare_settings {
    // The resolved type: a setting without a default is optional.
    (@resolved value $ty:ty) => { $ty };
    (@resolved computed $ty:ty) => { $ty };
    (@resolved none $ty:ty) => { Option<$ty> };

    // The resolved value, from the merged layer's.
    (@resolve value ($default:expr) $given:expr) => { $given.unwrap_or_else(|| $default) };
    (@resolve computed ($default:expr, $words:literal) $given:expr) => { $given.unwrap_or_else($default) };
    (@resolve none ($words:literal) $given:expr) => { $given };

    // The default, for the help and the docs.
    (@shown value ($default:expr) $ty:ty) => {
        $crate::config::declare::Shown::Value(|| {
            <$ty as $crate::config::values::Value>::show(&$default)
        })
    };
    (@shown computed ($default:expr, $words:literal) $ty:ty) => {
        $crate::config::declare::Shown::Words($words)
    };
    (@shown none ($words:literal) $ty:ty) => { $crate::config::declare::Shown::Words($words) };

    // A resolved value in words.
    (@show none ($words:literal) $ty:ty, $value:expr) => {
        $value
            .as_ref()
            .map_or_else(|| $words.to_string(), <$ty as $crate::config::values::Value>::show)
    };
    (@show $kind:ident $args:tt $ty:ty, $value:expr) => {
        <$ty as $crate::config::values::Value>::show($value)
    };

    // Runs a setting's check on its resolved value (if it has one).
    (@check none $check:expr, $value:expr) => {
        match $value {
            Some(value) => ($check)(value),
            None => Ok(()),
        }
    };
    (@check $kind:ident $check:expr, $value:expr) => { ($check)($value) };

    (
        $(#[doc = $config_doc:literal])*
        pub struct Config {
            $(
                $(#[doc = $doc:literal])*
                $name:ident: $ty:ty {
                    env: $env:literal,
                    value: $value_name:literal,
                    parse: $parse:expr,
                    default: $kind:ident $default:tt,
                    check: $check:expr,
                    reload: $reload:ident $(,)?
                }
            )*
        }
        loaded {
            $(
                $(#[doc = $loaded_doc:literal])*
                $loaded:ident: $loaded_ty:ty,
            )*
        }
    ) => {
        $(#[doc = $config_doc])*
        #[derive(Debug, Clone)]
        pub struct Config {
            $(
                $(#[doc = $doc])*
                pub $name: $crate::config::declare::declare_settings!(@resolved $kind $ty),
            )*
            $(
                $(#[doc = $loaded_doc])*
                pub $loaded: $loaded_ty,
            )*
        }

        /// What one source says: the flags (clap ranks each above its
        /// environment variable), or the config file. `None` where it says
        /// nothing; [`Layer::or`] stacks them.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct Layer {
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    env = $env,
                    value_name = $value_name,
                    value_parser = $parse,
                    num_args = $crate::config::declare::num_args::<$ty>(),
                    default_missing_value = $crate::config::declare::missing_value::<$ty>(),
                    help = $crate::config::declare::clap_help(
                        concat!($($doc, "\n",)*),
                        $crate::config::declare::declare_settings!(@shown $kind $default $ty),
                    ),
                    long_help = $crate::config::declare::clap_long_help(
                        concat!($($doc, "\n",)*),
                        $crate::config::declare::declare_settings!(@shown $kind $default $ty),
                    ),
                )]
                pub $name: Option<$ty>,
            )*
        }

        impl Layer {
            /// `self` where it says something, `lower` where it does not:
            /// precedence, one setting at a time.
            pub fn or(self, lower: Layer) -> Layer {
                Layer {
                    $($name: self.$name.or(lower.$name),)*
                }
            }

            /// Sets the setting the config file's `key` names from its TOML
            /// value, with the setting's own parser; `None` if no setting
            /// has that key.
            pub(crate) fn set_from_file(
                &mut self,
                key: &str,
                value: &toml::Value,
            ) -> Option<Result<(), $crate::config::file::FileError>> {
                $(
                    if $crate::config::declare::is_key(stringify!($name), key) {
                        return Some(
                            $crate::config::file::read::<$ty>(value, $parse)
                                .map(|v| self.$name = Some(v)),
                        );
                    }
                )*
                None
            }
        }

        impl Config {
            /// Every setting from `layer`, or its default.
            pub(crate) fn from_layer(layer: Layer) -> Config {
                Config {
                    $(
                        $name: $crate::config::declare::declare_settings!(
                            @resolve $kind $default layer.$name
                        ),
                    )*
                    $($loaded: Default::default(),)*
                }
            }

            /// Runs every setting's own check; the error names the flag.
            pub(crate) fn check_each(&self) -> Result<(), String> {
                $(
                    $crate::config::declare::declare_settings!(@check $kind $check, &self.$name)
                        .map_err(|why| format!("--{} {why}", stringify!($name).replace('_', "-")))?;
                )*
                Ok(())
            }

            /// The settings whose values differ in `wanted`, in
            /// declaration order, in words.
            pub fn differences(&self, wanted: &Config) -> Vec<$crate::config::declare::Difference> {
                let mut out = Vec::new();
                $(
                    if self.$name != wanted.$name {
                        out.push($crate::config::declare::Difference {
                            key: stringify!($name).replace('_', "-"),
                            from: $crate::config::declare::declare_settings!(
                                @show $kind $default $ty, &self.$name
                            ),
                            to: $crate::config::declare::declare_settings!(
                                @show $kind $default $ty, &wanted.$name
                            ),
                            reload: $crate::config::declare::Reload::$reload,
                        });
                    }
                )*
                out
            }

            /// Puts back `running`'s value of every setting a reload may
            /// not change.
            pub fn keep_restart_only(&mut self, running: &Config) {
                $(
                    if $crate::config::declare::Reload::$reload.is_restart() {
                        self.$name = running.$name.clone();
                    }
                )*
            }

            /// Every setting's key and value in words, in declaration
            /// order.
            pub fn shown(&self) -> Vec<(String, String)> {
                vec![
                    $((
                        stringify!($name).replace('_', "-"),
                        $crate::config::declare::declare_settings!(
                            @show $kind $default $ty, &self.$name
                        ),
                    ),)*
                ]
            }
        }

        impl Default for Config {
            /// Every setting at its default.
            fn default() -> Config {
                Config::from_layer(Layer::default())
            }
        }

        /// Every setting, in declaration order.
        pub static ALL: &[$crate::config::declare::Setting] = &[
            $(
                $crate::config::declare::Setting {
                    name: stringify!($name),
                    env: $env,
                    value_name: $value_name,
                    switch: <$ty as $crate::config::values::Value>::SWITCH,
                    doc: concat!($($doc, "\n",)*),
                    default: $crate::config::declare::declare_settings!(@shown $kind $default $ty),
                    reload: $crate::config::declare::Reload::$reload,
                },
            )*
        ];
    };
}

pub(crate) use declare_settings;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_names_in_kebab_case() {
        assert!(is_key("no_echo", "no-echo"));
        assert!(is_key("bind", "bind"));
        assert!(!is_key("no_echo", "no_echo"));
        assert!(!is_key("no_echo", "no-ech"));
        assert!(!is_key("bind", "bond"));
    }

    #[test]
    fn docs_become_one_line_paragraphs() {
        assert_eq!(
            paragraphs(" First line\n continued.\n\n Second.\n"),
            ["First line continued.", "Second."]
        );
        assert_eq!(
            clap_help(" Short.\n\n Long.\n", Shown::Words("none")),
            "Short. [default: none]"
        );
    }
}
