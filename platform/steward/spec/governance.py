"""The `governance` section: who owns the model, what it is for, how risky it is, and its licences.

It feeds the model card (Mitchell et al., 2019) written after training, and the organisation's policy checks.
"""

from typing import Literal

from pydantic import Field

from steward.spec.base import Section

Risk = Literal["low", "medium", "high"]
# The fields a card needs before it is "complete" (a policy may require that for high-risk models).
CARD_FIELDS = (
    "owners",
    "contact",
    "intended_use",
    "out_of_scope_uses",
    "ethical_considerations",
    "caveats_and_recommendations",
    "licence.data",
    "licence.model",
)


class LicenceSpec(Section):
    data: str = Field("", description="Licence of the training data (an SPDX id such as CC-BY-4.0, or a name).")
    model: str = Field("", description="Licence the trained model is released under (an SPDX id or a name).")


class GovernanceSpec(Section):
    owners: list[str] = Field(default_factory=list, description="People or teams accountable for the model.")
    contact: str = Field("", description="Where questions and incident reports go (an e-mail address or a channel).")
    intended_use: list[str] = Field(default_factory=list, description="Uses the model was built and evaluated for.")
    out_of_scope_uses: list[str] = Field(
        default_factory=list, description="Uses the model must not be put to (it was not evaluated for them)."
    )
    risk: Risk = Field(description="Risk level of the use case: low, medium or high (high draws stricter policy).")
    ethical_considerations: list[str] = Field(
        default_factory=list, description="Ethical considerations: sensitive data, affected groups, possible harms."
    )
    caveats_and_recommendations: list[str] = Field(
        default_factory=list, description="Known limits of the model and advice to its users."
    )
    licence: LicenceSpec = Field(default_factory=LicenceSpec, description="Licences of the data and of the model.")

    def missing_card_fields(self) -> list[str]:
        """Card fields left empty, as dotted paths under `governance`."""
        missing = []
        for path in CARD_FIELDS:
            value: object = self
            for part in path.split("."):
                value = getattr(value, part)
            if not value:
                missing.append(path)
        return missing
