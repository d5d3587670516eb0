//! The operations besides conversion, one file each: [`map`](map::map),
//! [`compare`](compare::compare), [`checksum`](checksum::checksum), in-place
//! conversion ([`plan_in_place`]), [`sparsify`](sparsify::sparsify) and
//! [`resize`](resize::resize).
//!
//! Read-only operations walk the map a window at a time and never read what
//! the map knows to be zero. In-place operations are sequences of [`Step`]s
//! ordered so that an interruption after any step leaves a valid image (see
//! [`InPlacePlan`]).

mod checksum;
mod compare;
mod in_place;
mod map;
mod resize;
mod sparsify;

pub use checksum::*;
pub use compare::*;
pub use in_place::*;
pub use map::*;
pub use resize::*;
pub use sparsify::*;
