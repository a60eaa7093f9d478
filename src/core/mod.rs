//! The relay's core: everything that decides, nothing that does I/O.
//!
//! These modules are state machines and pure functions over bytes and time
//! (quinn-proto is the model: it "contains no networking code and does not
//! get any relevant timestamps from the operating system"). The caller
//! passes `now` and the datagram's bytes in; decisions come back out as
//! values ([`hub::Effect`]) for the runtime to carry out with the batched
//! syscalls. That is what lets them be tested without sockets, fuzzed,
//! replayed (`tests/replay.rs`), and driven by more than one runtime
//! (several loops, a cluster bridge).
//!
//! Nothing here takes a lock, touches an atomic or starts a thread. What
//! the loops of one relay share reaches the hub through an interface the
//! core owns, with a plain implementation here and a shared one in the
//! runtime: [`census::Census`] (the relay-wide caps) and
//! [`limits::CookieBudget`] (verify mode's cookie replies).
//!
//! - [`protocol`]: what a datagram means; the `--format` template.
//! - [`addr`]: client addresses kept in the kernel's `sockaddr` layout.
//! - [`admission`]: the one step that may drop a datagram, and every reason.
//! - [`cookie`]: stateless source cookies for verify mode.
//! - [`counts`]: the plain counters the core and the runtime add to.
//! - [`rooms`]: per-room member lists, so fan-out is O(room), never O(table).
//! - [`table`]: the client table (address → slab slot, with generations).
//! - [`token`]: room tokens (HS256 JWTs): verify and mint.
//! - [`wheel`]: the hashed timer wheel for heartbeat expiry.
//! - [`clock`]: instants to wheel ticks.
//! - [`limits`]: token buckets, the bounded per-prefix table, and the
//!   cookie-reply budget's interface ([`limits::CookieBudget`]).
//! - [`census`]: the relay-wide counts the caps are checked against: the
//!   [`census::Census`] interface and its plain local implementation
//!   (the loops of `--threads` share the runtime's).
//! - [`snapshot`]: the state a hand-over passes on, as bounded bytes.
//! - [`hub`]: the relay's state machine, which ties them together.
//! - [`backlog`]: fan-outs a loop has yet to finish (sliced, or waiting for
//!   the send buffer), per room in order, bounded in bytes.
//! - [`reply_backlog`]: replies a full send buffer would not take, in
//!   order until it has room, bounded in bytes.

/// Declares a fieldless enum whose variants each carry a metric label, with
/// `ALL`, `COUNT`, [`label`](DropReason::label) and an index for arrays of
/// counters: adding a variant is one line here, and every counter array,
/// metric registration and label follows from it.
macro_rules! labelled_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order (= [`index`](Self::index) order).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// How many variants there are: the length of counter arrays.
            pub const COUNT: usize = Self::ALL.len();

            /// The metric label value.
            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// The position in [`ALL`](Self::ALL), for counter arrays.
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}
pub(crate) use labelled_enum;

pub mod addr;
pub mod admission;
pub mod backlog;
pub mod census;
pub mod clock;
pub mod cookie;
pub mod counts;
pub mod hub;
pub mod limits;
pub mod protocol;
pub mod reply_backlog;
pub mod rooms;
pub mod snapshot;
pub mod table;
pub mod token;
pub mod wheel;

pub use admission::DropReason;
