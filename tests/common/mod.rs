//! Helpers shared by integration tests.
pub mod real_node_template;
pub mod real_template;
pub mod tiny_guest;
