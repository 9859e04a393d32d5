// The console works without scripts; this only spares a click on the class selector.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("class-select");
  if (select && select.form) {
    select.addEventListener("change", () => select.form.submit());
  }
});
