//! The processor sits between the frontend and the router: it turns an OpenAI request into token
//! ids (tokenizing, rendering the model's chat template) and turns the engine's token ids back
//! into text (incremental detokenization, stop conditions). It runs inside the frontend process,
//! as Dynamo's does. Only the chat template exists today.

pub mod chat_template;

pub use chat_template::{ChatMessage, ChatTemplate, TemplateError};
