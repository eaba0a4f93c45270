//! The processor sits between the frontend and the router: it turns an OpenAI request into token
//! ids (tokenizing, rendering the model's chat template) and turns the engine's token ids back
//! into text (incremental detokenization, stop strings). It runs inside the frontend process,
//! as Dynamo's does.

pub mod chat_template;
pub mod detokenizer;
pub mod model;
pub mod output;
pub mod stop_strings;

pub use chat_template::{ChatMessage, ChatTemplate, TemplateError};
pub use detokenizer::{DetokenizeError, Detokenizer};
pub use model::{PromptError, ServedModel};
pub use output::{ChoiceOutput, OutputStep};
pub use stop_strings::{Release, StopStrings};
