//! Who this node talks to and what it accepts, as plain policy that the I/O layers above ask:
//! [`members`] (the allow-list of member nodes, with the members file watched) and [`routes`]
//! (which authors and subjects are published and accepted). Nothing here imports a module of
//! the node above `config`, so `network`, `blobs`, `routing` and `datasets` all depend on it
//! and not on each other.

pub mod members;
pub mod routes;

pub use members::Members;
pub use routes::Routes;
